#!/usr/bin/env bash
# Makes, once, the Debian 12 tree the systemd tests boot with systemd-nspawn: systemd, fuse3,
# Debian's orthanc (disabled until a test configures it), and /opt/objfs, a virtualenv with
# objfs' dependencies installed from wheels built here. Cached in
# $OBJFS_NSPAWN (default /var/cache/objfs-test/nspawn/root); tests boot it with
# --volatile=overlay, so it stays as built, and install the checkout's objfs into it.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${OBJFS_NSPAWN:-/var/cache/objfs-test/nspawn/root}
# The stamp is the requirements' hash: a changed dependency set builds the tree again.
stamp=$(sha256sum requirements.txt | cut -c1-16)
[ "$(cat "$target/.objfs-ready" 2>/dev/null)" = "$stamp" ] \
    && { echo "nspawn-root: $target ready"; exit 0; }
export DEBIAN_FRONTEND=noninteractive
for tool in debootstrap systemd-nspawn; do
    command -v "$tool" >/dev/null && continue
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends debootstrap systemd-container >/dev/null
done
mirror=$(bash "$(dirname "$0")/debian-mirror.sh")
echo "nspawn-root: building $target"
rm -rf "$target.tmp"
mkdir -p "$(dirname "$target")"
log="$(dirname "$target")/build.log"
debootstrap --variant=minbase bookworm "$target.tmp" "$mirror" >"$log" 2>&1 \
    || { tail -20 "$log"; exit 1; }
cp /etc/resolv.conf "$target.tmp/etc/resolv.conf"
mount -t proc proc "$target.tmp/proc"
trap 'umount "$target.tmp/proc" 2>/dev/null || true' EXIT
chroot "$target.tmp" sh -c 'apt-get -qq update && apt-get install -y -qq --no-install-recommends \
    systemd systemd-sysv dbus fuse3 python3 python3-venv orthanc e2fsprogs curl \
    ca-certificates && systemctl disable orthanc.service' >>"$log" 2>&1 \
    || { tail -20 "$log"; exit 1; }
.venv/bin/pip wheel -q -r requirements.txt -w "$target.tmp/wheels" 2>&1 \
    | { grep -v "is ignored: it is neither" || true; }
cp requirements.txt "$target.tmp/wheels/"
chroot "$target.tmp" sh -c 'python3 -m venv /opt/objfs && /opt/objfs/bin/pip install -q \
    --no-index --find-links /wheels -r /wheels/requirements.txt' >>"$log" 2>&1 \
    || { tail -20 "$log"; exit 1; }
umount "$target.tmp/proc"
trap - EXIT
echo "$stamp" >"$target.tmp/.objfs-ready"
rm -rf "$target"
mv "$target.tmp" "$target"
echo "nspawn-root: $target ready"
