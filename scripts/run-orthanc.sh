#!/usr/bin/env bash
# Sets up objfs and runs it with the Debian orthanc package on top, on the embedded local
# bucket (no cloud needed), until Ctrl-C. Configuration: /etc/objfs/*.json if present.
#   OBJFS_MOUNT (default /var/lib/orthanc/objfs), ORTHANC_INDEX (/var/lib/orthanc/objfs-index),
#   ORTHANC_HTTP_PORT (8042), ORTHANC_DICOM_PORT (4242), OBJFS_CONFIG_DIR (/etc/objfs),
#   OBJFS_LOG_DIR (/var/log/objfs), OBJFS_DEMO_STATE (/run/objfs-demo: Orthanc's configuration)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

mnt=${OBJFS_MOUNT:-/var/lib/orthanc/objfs}
index=${ORTHANC_INDEX:-/var/lib/orthanc/objfs-index}
http_port=${ORTHANC_HTTP_PORT:-8042}
dicom_port=${ORTHANC_DICOM_PORT:-4242}
state=${OBJFS_DEMO_STATE:-/run/objfs-demo}
config_dir=${OBJFS_CONFIG_DIR:-/etc/objfs}
logs=${OBJFS_LOG_DIR:-/var/log/objfs}
mkdir -p "$config_dir" "$state" "$index" "$logs"
# Always a directory of objfs' own (empty: the embedded defaults), never the default
# /etc/orthanc.
config_args=(--config "$config_dir")

# Only when its ports are the ones asked for here (the package's defaults).
if { [ "$http_port" = 8042 ] || [ "$dicom_port" = 4242 ]; } && command -v systemctl >/dev/null \
        && systemctl is-active --quiet orthanc 2>/dev/null; then
    echo "run: stopping the packaged orthanc service (it serves the plain disk on port 8042)"
    systemctl stop orthanc
fi

if ! grep -q " $mnt fuse.objfs " /proc/self/mountinfo; then
    mkdir -p "$mnt"
    chattr -i "$mnt" 2>/dev/null || true  # from an earlier run
    chown orthanc:orthanc "$mnt" "$index"
    # An empty mount point must not accept files while objfs is not mounted (they would
    # be hidden, then lost, by the next mount): make it immutable where the fs allows it.
    chattr +i "$mnt" 2>/dev/null || echo "run: note: chattr +i unsupported on $mnt"
fi

.venv/bin/objfs mount "${config_args[@]}" "$mnt" >>"$logs/objfs.log" 2>&1 &
objfs_pid=$!
for _ in $(seq 100); do
    grep -q " $mnt fuse.objfs " /proc/self/mountinfo && break
    kill -0 "$objfs_pid" 2>/dev/null || { tail -5 "$logs/objfs.log"; exit 1; }
    sleep 0.1
done

cat > "$state/orthanc.json" <<JSON
{
  "Name": "Orthanc on objfs",
  "StorageDirectory": "$mnt",
  "IndexDirectory": "$index",
  "HttpPort": $http_port,
  "DicomPort": $dicom_port,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "SyncStorageArea": true,
  "Plugins": []
}
JSON
runuser -u orthanc -- /usr/sbin/Orthanc "$state/orthanc.json" >>"$logs/orthanc.log" 2>&1 &
orthanc_pid=$!

stop() {
    kill "$orthanc_pid" 2>/dev/null && wait "$orthanc_pid" 2>/dev/null || true
    kill "$objfs_pid" 2>/dev/null && wait "$objfs_pid" 2>/dev/null || true
    echo "run: stopped (logs in $logs/)"
}
trap stop EXIT
trap 'exit 130' INT TERM
for _ in $(seq 300); do
    curl -fs "http://127.0.0.1:$http_port/system" >/dev/null 2>&1 && break
    kill -0 "$orthanc_pid" 2>/dev/null || { tail -5 "$logs/orthanc.log"; exit 1; }
    sleep 0.2
done
echo "Orthanc is running on objfs: http://127.0.0.1:$http_port/ (DICOM port $dicom_port)"
echo "objfs mount: $mnt (bucket: Objfs.LocalBucket, default /var/lib/objfs/bucket)"
echo "objfs REST API (status, health, metrics, move-storage): http://127.0.0.1:8044/status"
echo "Status: .venv/bin/objfs status ${config_args[*]}   Stop: Ctrl-C"
wait "$orthanc_pid"
