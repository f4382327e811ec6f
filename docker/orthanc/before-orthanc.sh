#!/bin/sh
# BEFORE_ORTHANC_STARTUP_SCRIPT of the orthanc-objfs image: mount objfs on Orthanc's
# StorageDirectory and return only once the mount answers, so that Orthanc never writes to
# the bare directory. objfs reads the same sources as the orthancteam image (/etc/orthanc/*.json,
# /run/secrets, ORTHANC__* variables). objfs keeps running in the background; its log goes to
# this container's output. Exits non-zero (and Orthanc does not start) if objfs cannot mount.
#
# One container has one stop signal, and it goes to Orthanc: when the container stops, objfs
# is killed without draining. Nothing is lost (what is not uploaded yet stays journaled in
# /var/cache/objfs, a volume) and it is uploaded at the next start. Use docker-compose.yml
# (two containers) to drain at every stop.
set -eu
mountpoint="${OBJFS_MOUNTPOINT:-/var/lib/orthanc/db}"
config="${OBJFS_CONFIG:-/etc/orthanc}"
timeout="${OBJFS_START_TIMEOUT:-120}"
pidfile="${OBJFS_PIDFILE:-/run/objfs.pid}"

objfs config check --config "$config" >&2 || exit 2
mkdir -p "$mountpoint"
objfs mount --config "$config" "$mountpoint" </dev/null &
pid=$!
echo "$pid" > "$pidfile"
waited=0
while :; do
    if findmnt -rn -t fuse.objfs -M "$mountpoint" >/dev/null 2>&1 \
            && stat -f "$mountpoint" >/dev/null 2>&1; then
        echo "objfs: mounted on $mountpoint (pid $pid)" >&2
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        status=0
        wait "$pid" || status=$?
        echo "objfs: failed to mount $mountpoint (exit status $status); Orthanc not started" >&2
        exit 1
    fi
    if [ "$waited" -ge "$((timeout * 10))" ]; then
        echo "objfs: $mountpoint did not answer within ${timeout}s; Orthanc not started" >&2
        kill "$pid" 2>/dev/null || true
        exit 1
    fi
    sleep 0.1
    waited=$((waited + 1))
done
