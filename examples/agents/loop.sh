#!/bin/sh
# A fake agent that never finishes: spins until its timeout kills it.
echo "thinking forever"
while :; do :; done
