#!/bin/sh
# A second libvirt daemon on this machine that stands in for a remote host in
# the multi-host tests: `sh scripts/libvirt-host2.sh start|stop|uri|status`.
#
# It runs in its own mount and PID namespaces (`unshare`), as root, with its
# own /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt and
# /var/cache/libvirt (bind-mounted from $STATE) and /run/lock (an empty tmpfs:
# the console and channel lock files libvirt leaves when the namespace is
# killed go with it), so it shares no state with
# the system daemon of scripts/start-libvirtd.sh. /tmp and the workspace are
# hidden from it (empty tmpfs mounts): like a real remote host it cannot read
# this machine's image files, so the backend must upload them through the
# storage API. Its socket is the only thing visible outside:
#
#   qemu+unix:///system?socket=/run/agentvm-libvirt2/libvirt-sock
#
# `stop` kills the namespace's init, and with it the daemon and every QEMU it
# started (the host "goes away"); its state directory is removed.
#
# Needs what scripts/start-libvirtd.sh installs (run that first).
#
# Environment:
#   AGENTVM_HOST2_NAME  name of the run/state directories (default agentvm-libvirt2)
#   AGENTVM_HOST2_HIDE  directories hidden from the daemon (default: /tmp and
#                       the workspace root)
#   AGENTVM_HOST2_WAIT  seconds to wait for the daemon to answer (default 30)
set -eu

NAME=${AGENTVM_HOST2_NAME:-agentvm-libvirt2}
RUN=/run/$NAME
STATE=/var/lib/$NAME
PIDFILE=/run/$NAME.pid
SOCK=$RUN/libvirt-sock
URI="qemu+unix:///system?socket=$SOCK"
WAIT=${AGENTVM_HOST2_WAIT:-30}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HIDE=${AGENTVM_HOST2_HIDE:-/tmp $ROOT}

say() { echo "libvirt-host2: $*" >&2; }
die() { say "error: $*"; exit 1; }

answers() { virsh -c "$URI" version >/dev/null 2>&1; }
running_pid() {
    [ -f "$PIDFILE" ] || return 1
    pid=$(cat "$PIDFILE")
    kill -0 "$pid" 2>/dev/null && echo "$pid"
}

stop() {
    if pid=$(running_pid); then
        say "stopping (unshare pid $pid: the namespace's daemon and QEMUs die with it)"
        kill "$pid"
        i=0
        while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$PIDFILE"
    rm -rf "$RUN" "$STATE"
}

start() {
    [ "$(id -u)" = 0 ] || die "must run as root"
    command -v libvirtd >/dev/null || die "libvirtd not installed: run scripts/start-libvirtd.sh first"
    # The storage driver (uploads go through its API); the same version as
    # the installed libvirt0. Only this daemon loads it: the system daemon is
    # not restarted.
    if ! dpkg-query -W -f='${Status}' libvirt-daemon-driver-storage 2>/dev/null | grep -q 'install ok installed'; then
        v=$(dpkg-query -W -f='${Version}' libvirt0)
        say "installing libvirt-daemon-driver-storage=$v"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            "libvirt-daemon-driver-storage=$v" >/tmp/libvirt-host2-apt.log 2>&1 \
            || { tail -n 20 /tmp/libvirt-host2-apt.log >&2; die "apt-get install failed"; }
    fi
    if running_pid >/dev/null && answers; then
        say "already answers at $URI"
        return 0
    fi
    stop
    mkdir -p "$RUN" "$STATE/etc" "$STATE/lib/qemu" "$STATE/log/qemu" "$STATE/cache"
    # Only the daemon's own settings: no networks, filters or domains of the
    # system daemon (an autostarted copy of its NAT network would clash).
    for f in libvirt.conf libvirtd.conf qemu.conf; do
        [ -f "/etc/libvirt/$f" ] && cp "/etc/libvirt/$f" "$STATE/etc/$f"
    done
    # No virtlogd in the namespace: QEMU's stdio goes to a file directly.
    {
        echo 'user = "root"'
        echo 'group = "root"'
        echo 'stdio_handler = "file"'
    } >>"$STATE/etc/qemu.conf"
    hide=""
    for d in $HIDE; do
        case $d in /|/usr|/usr/*|/etc|/run|/var|/var/lib) continue ;; esac
        # Checked again inside: a directory under one hidden before (the
        # workspace under /tmp) is already out of sight and no mount point.
        [ -d "$d" ] && hide="$hide if [ -d '$d' ]; then mount -t tmpfs -o size=1m,mode=0755 agentvm-host2-hidden '$d'; fi;"
    done
    # --kill-child: killing unshare kills the namespace's init (tini), and the
    # kernel then kills everything else in the PID namespace.
    setsid nohup unshare --mount --pid --fork --mount-proc --propagation private --kill-child \
        sh -c "set -e
            mount --bind '$STATE/etc' /etc/libvirt
            mount --bind '$RUN' /run/libvirt
            mount --bind '$STATE/lib' /var/lib/libvirt
            mount --bind '$STATE/log' /var/log/libvirt
            mount --bind '$STATE/cache' /var/cache/libvirt
            mount -t tmpfs -o mode=1777 agentvm-host2-lock /run/lock
            $hide
            exec tini -s -- libvirtd --pid-file /run/libvirt/libvirtd.pid" \
        >>"$STATE/daemon.log" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    i=0
    while [ "$i" -lt "$((WAIT * 5))" ]; do
        if answers; then
            say "answers at $URI"
            return 0
        fi
        running_pid >/dev/null || break
        sleep 0.2
        i=$((i + 1))
    done
    say "did not answer at $URI; last lines of $STATE/daemon.log:"
    tail -n 30 "$STATE/daemon.log" >&2 || true
    stop
    exit 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    uri) echo "$URI" ;;
    status) if running_pid >/dev/null && answers; then echo "running: $URI"; else echo "stopped"; exit 1; fi ;;
    *) die "usage: $0 start|stop|uri|status" ;;
esac
