#!/usr/bin/env bash
# Installs the Debian packages agentvm needs on the host. Idempotent.
# Debian 12 (bookworm) ships QEMU 7.2; when the machine already carries
# qemu-utils from bookworm-backports (10.x), qemu-system-x86 must come from
# there too, so we always take QEMU from backports.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

. /etc/os-release
codename="${VERSION_CODENAME:-bookworm}"
backports="/etc/apt/sources.list.d/agentvm-backports.list"
if [ "$codename" = "bookworm" ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee "$backports" >/dev/null
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq

qemu_release=()
if [ "$codename" = "bookworm" ]; then
    qemu_release=(-t bookworm-backports)
fi

$SUDO apt-get install -y -qq --no-install-recommends "${qemu_release[@]}" \
    qemu-system-x86 qemu-utils
$SUDO apt-get install -y -qq --no-install-recommends \
    busybox-static cpio pkg-config ca-certificates file gcc libc6-dev
# The Debian `agent` image: mmdebstrap builds its root file system, erofs-utils
# packs it; npm (from Debian unless the host has one) installs agent recipes.
$SUDO apt-get install -y -qq --no-install-recommends mmdebstrap erofs-utils
if ! command -v npm >/dev/null; then
    $SUDO apt-get install -y -qq --no-install-recommends nodejs npm
fi

# The bench's container baseline (`cargo xtask bench`, peer rows): Debian's
# Docker engine; the bench starts its own dockerd (no bridge, no iptables) when
# none runs, and imports its image locally (no registry).
$SUDO apt-get install -y -qq --no-install-recommends docker.io
# The bench's vmtest rows: vmtest's guest runs the host's qemu-ga over 9p.
$SUDO apt-get install -y -qq --no-install-recommends qemu-guest-agent

# Headless Chromium: `cargo xtask report-check` loads the HTML report in it.
$SUDO apt-get install -y -qq --no-install-recommends chromium

# QEMU runs as this unprivileged user when the harness runs as root
# (agentvm-runtime's qemu::jail); idempotent.
if [ "$(id -u)" -eq 0 ] && ! id agentvm-qemu >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin agentvm-qemu
fi

echo "installed: $(qemu-system-x86_64 --version | head -1)"
