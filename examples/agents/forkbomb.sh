#!/bin/sh
# A fake agent that fork-bombs the guest, contained: with cgroup v2 the bomb
# runs in a cgroup limited to 256 processes (forks beyond fail); without it,
# the bomb stops at 2^8 sleeping leaves. Either way it runs until its
# timeout kills the whole process tree.
#
# Every bomb process sleeps after forking: a classic bomb whose processes
# exit at once dies out as soon as the cgroup is full and its forks fail,
# which on a slow guest can happen between two process scans.
cg=/sys/fs/cgroup/agentvm-forkbomb
if echo +pids >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null &&
    mkdir -p "$cg" 2>/dev/null &&
    echo 256 >"$cg/pids.max" 2>/dev/null; then
    echo "fork bomb (at most 256 processes)"
    # The bomb joins the cgroup in a shell of its own; this one stays out,
    # so its loop below can still fork `sleep` when the cgroup is full.
    sh -c 'echo $$ >"$1/cgroup.procs" || exit 1; bomb() { bomb | bomb & sleep 3600; }; bomb' \
        forkbomb "$cg" 2>/dev/null &
else
    echo "fork bomb (2^8 leaves)"
    bomb() {
        if [ "$1" -gt 0 ]; then
            bomb $(($1 - 1)) &
            bomb $(($1 - 1)) &
            wait
        else
            sleep 3600
        fi
    }
    bomb 8 2>/dev/null &
fi
while :; do sleep 1; done
