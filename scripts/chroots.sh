#!/usr/bin/env bash
# Builds, once, the Debian chroots whose newer Orthanc packages the end-to-end tests also run:
# trixie (Orthanc 1.12.x) and sid (1.13.x). Cached in $OBJFS_CHROOTS (default
# /var/cache/objfs-test/chroots) between runs on one machine; a chroot is rebuilt only when it
# has no .objfs-ready stamp. The mirror is the one this machine's apt already uses.
set -euo pipefail
root=${OBJFS_CHROOTS:-/var/cache/objfs-test/chroots}
releases=("$@")
[ "${#releases[@]}" -gt 0 ] || releases=(trixie sid)

if ! command -v debootstrap >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi
mirror=$(bash "$(dirname "$0")/debian-mirror.sh")
mkdir -p "$root"
for release in "${releases[@]}"; do
    target="$root/$release"
    [ -f "$target/.objfs-ready" ] && continue
    echo "chroots: building $release (Debian's orthanc) in $target"
    rm -rf "$target.tmp"
    debootstrap --variant=minbase --include=ca-certificates "$release" "$target.tmp" \
        "$mirror" >"$root/$release.log" 2>&1 || { tail -20 "$root/$release.log"; exit 1; }
    cp /etc/resolv.conf "$target.tmp/etc/resolv.conf"
    mount -t proc proc "$target.tmp/proc"
    # sid's and testing's indexes may be older than their Valid-Until during a freeze.
    if ! chroot "$target.tmp" sh -c 'export DEBIAN_FRONTEND=noninteractive;
            apt-get -qq -o Acquire::Check-Valid-Until=false update &&
            apt-get install -y -qq --no-install-recommends orthanc' \
            >>"$root/$release.log" 2>&1; then
        umount "$target.tmp/proc"
        tail -20 "$root/$release.log"
        exit 1
    fi
    umount "$target.tmp/proc"
    # Not "| head -1": head exits after one line, and Orthanc writing the rest gets SIGPIPE,
    # which pipefail turns into a silent exit of this script (about 1 build in 4).
    version=$(chroot "$target.tmp" /usr/sbin/Orthanc --version)
    printf '%s\n' "${version%%$'\n'*}" >"$target.tmp/.objfs-ready"
    mv "$target.tmp" "$target"
done
for release in "${releases[@]}"; do
    echo "chroots: $release: $(cat "$root/$release/.objfs-ready")"
done
