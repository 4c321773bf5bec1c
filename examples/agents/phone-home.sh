#!/bin/sh
# A fake agent that tries to reach the network: a TCP connection to a
# documentation address (TEST-NET-3, never routed) and a DNS-style UDP
# packet. In an isolated VM (no NIC) both fail at once with "network
# unreachable"; the guest counts the packets it had no route for, and the
# harness reports a `network_attempt` anomaly. Nothing leaves the VM.
nc -w 1 203.0.113.7 443 </dev/null 2>/dev/null && echo "connected?!" || echo "no network"
echo ping | nc -u -w 1 203.0.113.53 53 2>/dev/null
echo "tried to phone home"
