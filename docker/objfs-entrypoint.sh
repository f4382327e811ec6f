#!/bin/sh
# Entry point of the objfs image: checks the configuration (JSON files in $OBJFS_CONFIG,
# default /etc/orthanc; Docker secrets in /run/secrets; ORTHANC__* variables: the orthancteam
# way), then becomes `objfs mount` on $OBJFS_MOUNTPOINT, so that SIGTERM reaches the daemon.
# Arguments are passed to `objfs mount` (e.g. --log-level DEBUG).
set -eu
mountpoint="${OBJFS_MOUNTPOINT:-/mnt/orthanc-storage}"
config="${OBJFS_CONFIG:-/etc/orthanc}"
# Every problem is listed, and the container stops with status 2 instead of restarting blind.
objfs config check --config "$config" >&2 || exit 2
mkdir -p "$mountpoint"
exec objfs mount --config "$config" "$@" "$mountpoint"
