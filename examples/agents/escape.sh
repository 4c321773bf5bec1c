#!/bin/sh
# A fake agent that writes outside its workspace. Allowed inside the VM
# (that is what the VM is for), invisible in the workspace changes, and gone
# after the revert.
set -eu
echo "agentvm was here" >/etc/agentvm-was-here
echo x >/tmp/x
echo "wrote /etc/agentvm-was-here and /tmp/x"
