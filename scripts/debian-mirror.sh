#!/usr/bin/env bash
# Prints the Debian mirror this machine's apt already uses (deb822 sources first, then
# sources.list), for the debootstraps of scripts/chroots.sh, images.sh and nspawn-root.sh.
set -euo pipefail
mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
         | grep -v security | head -1 || true)
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || { echo "debian-mirror: no Debian mirror in apt's sources" >&2; exit 1; }
echo "$mirror"
