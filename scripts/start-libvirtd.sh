#!/bin/sh
# Installs (if missing) and starts the libvirt system daemon on a Debian 12
# machine without systemd, as root. Idempotent: a daemon that already answers
# is left alone.
#
# What libvirt 9.0/11.x needs here (measured on Debian 12 machines without systemd):
#   * a `libvirt-qemu` system user and group;
#   * `user = "root"` / `group = "root"` in /etc/libvirt/qemu.conf;
#   * /var/log/libvirt/qemu and virtlogd running before libvirtd;
#   * iptables and dnsmasq-base installed *before* libvirtd starts (it caches
#     their absence, and NAT networks / nwfilters then fail);
#   * the storage driver for the multi-host tests' second daemon
#     (scripts/libvirt-host2.sh), whose image arrives through the storage API;
#   * libvirtd under a subreaper (`tini -s`): PID 1 on these machines reaps
#     orphans 1.2-1.4 s late and libvirtd waits for its QEMUs to vanish, so
#     without one every destroy takes ~2 s and every revert ~3 s.
#
# Environment:
#   LIBVIRTD_LOG   daemon log (default /var/log/libvirt/libvirtd-agentvm.log)
#   LIBVIRTD_WAIT  seconds to wait for the daemon to answer (default 30)
#   NO_INSTALL=1   do not run apt-get (fail if something is missing)
set -eu

URI=qemu:///system
LOG=${LIBVIRTD_LOG:-/var/log/libvirt/libvirtd-agentvm.log}
WAIT=${LIBVIRTD_WAIT:-30}

say() { echo "start-libvirtd: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (the system daemon qemu:///system)"

answers() { virsh -c "$URI" version >/dev/null 2>&1; }

# --- packages -------------------------------------------------------------
PKGS="libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-driver-network libvirt-daemon-driver-nwfilter libvirt-daemon-driver-storage libvirt-clients libvirt-dev iptables dnsmasq-base tini"
# Install a package set matching the installed libvirt0 (it may come from
# bookworm-backports, e.g. pulled in by libvirt-dev; mixing 9.0 daemon
# packages with an 11.x libvirt0 does not resolve).
missing=""
installed_now=0
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
# QEMU from bookworm-backports wants libvirt from there too; a libvirt0 9.0
# from bookworm (e.g. pulled in by `apt-get install libvirt-dev`) is
# upgraded with the rest rather than matched.
qemu_ver=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
libvirt0_ver=$(dpkg-query -W -f='${Version}' libvirt0 2>/dev/null || true)
case "$qemu_ver:$libvirt0_ver" in
    *bpo12*:*bpo12* | *bpo12*:) ;;
    *bpo12*:*) missing="$PKGS libvirt0" ;;
esac
if [ -n "$missing" ]; then
    [ "${NO_INSTALL:-0}" = 1 ] && die "missing packages:$missing (NO_INSTALL=1)"
    say "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt_args=""
    if [ -n "$libvirt0_ver" ] && [ "$missing" != "$PKGS libvirt0" ]; then
        # Pin the libvirt packages to the installed libvirt0 version.
        pinned=""
        for p in $missing; do
            case $p in
                libvirt-*) pinned="$pinned $p=$libvirt0_ver" ;;
                *) pinned="$pinned $p" ;;
            esac
        done
        missing=$pinned
    else
        # No libvirt yet: take it from the release QEMU came from (install-deps.sh
        # takes QEMU from bookworm-backports; libvirt 9.0 predates QEMU 10).
        case $qemu_ver in
            *bpo12*) apt_args="-t bookworm-backports" ;;
        esac
    fi
    if ! apt-get install -y --no-install-recommends $apt_args $missing >/tmp/start-libvirtd-apt.log 2>&1; then
        apt-get update >/dev/null 2>&1 || true
        apt-get install -y --no-install-recommends $apt_args $missing >/tmp/start-libvirtd-apt.log 2>&1 \
            || { tail -n 30 /tmp/start-libvirtd-apt.log >&2; die "apt-get install failed"; }
    fi
    installed_now=1
fi

if answers; then
    if [ "$installed_now" = 0 ]; then
        say "libvirtd already answers at $URI"
        exit 0
    fi
    # New drivers (or iptables/dnsmasq) are only picked up by a fresh daemon.
    pid=$(pgrep -x libvirtd | head -n 1)
    say "packages were installed: restarting libvirtd (pid $pid)"
    kill "$pid"
    i=0
    while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
fi

# --- user, configuration, directories --------------------------------------
getent group libvirt-qemu >/dev/null 2>&1 || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null 2>&1 \
    || useradd --system --no-create-home --home-dir /var/lib/libvirt --shell /usr/sbin/nologin -g libvirt-qemu libvirt-qemu
getent group libvirt >/dev/null 2>&1 || groupadd --system libvirt

conf=/etc/libvirt/qemu.conf
[ -f "$conf" ] || die "$conf missing: is libvirt-daemon-driver-qemu installed?"
set_conf() { # key value
    if grep -Eq "^[[:space:]]*$1[[:space:]]*=" "$conf"; then
        sed -i -E "s|^[[:space:]]*$1[[:space:]]*=.*|$1 = \"$2\"|" "$conf"
    else
        printf '%s = "%s"\n' "$1" "$2" >>"$conf"
    fi
}
set_conf user root
set_conf group root

mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/run/libvirt "$(dirname "$LOG")"

# --- virtlogd --------------------------------------------------------------
if ! pgrep -x virtlogd >/dev/null 2>&1; then
    say "starting virtlogd"
    virtlogd -d
fi

# --- libvirtd --------------------------------------------------------------
# A libvirtd left over without answering (crashed, stale pid file) is not ours to kill;
# but a stale pid file blocks a new one.
if ! pgrep -x libvirtd >/dev/null 2>&1; then
    rm -f /var/run/libvirtd.pid /run/libvirtd.pid
    : >>"$LOG"
    echo "=== $(date -u +%FT%TZ) start-libvirtd.sh" >>"$LOG"
    if command -v tini >/dev/null 2>&1; then
        say "starting libvirtd under tini -s (log: $LOG)"
        # setsid + nohup: detached from this shell's session and terminal.
        setsid nohup tini -s -- libvirtd >>"$LOG" 2>&1 </dev/null &
    else
        say "tini not found: starting libvirtd -d (destroy/revert will be slow)"
        libvirtd -d >>"$LOG" 2>&1 </dev/null
    fi
else
    say "a libvirtd process exists but does not answer yet; waiting"
fi

i=0
while [ "$i" -lt "$((WAIT * 5))" ]; do
    if answers; then
        say "libvirtd answers at $URI ($(virsh -c "$URI" version 2>/dev/null | grep -i 'running hypervisor' | sed 's/.*: *//'))"
        exit 0
    fi
    sleep 0.2
    i=$((i + 1))
done
say "libvirtd did not answer at $URI within ${WAIT}s; last lines of $LOG:"
tail -n 30 "$LOG" >&2 || true
exit 1
