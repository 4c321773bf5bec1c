#!/bin/sh
# A fake agent that floods its output: 10 MB on stdout, 1 MB on stderr.
# The harness keeps only the first bytes (the agent's output limit).
yes "flood flood flood" | head -c 10000000
yes "error" | head -c 1000000 >&2
echo "flooding done"
