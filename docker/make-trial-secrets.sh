#!/bin/sh
# Creates docker/secrets/ for docker-compose.yml: random MinIO credentials and an objfs
# master key (keep a copy of it: without it the bucket cannot be read). Existing files stay.
set -eu
dir="$(dirname "$0")/secrets"
mkdir -p "$dir"
chmod 0700 "$dir"
umask 077
[ -s "$dir/s3-access-key" ] || printf 'objfs-%s' "$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')" > "$dir/s3-access-key"
[ -s "$dir/s3-secret-key" ] || od -An -N24 -tx1 /dev/urandom | tr -d ' \n' > "$dir/s3-secret-key"
[ -s "$dir/objfs-master-key" ] || head -c 32 /dev/urandom | base64 > "$dir/objfs-master-key"
echo "secrets in $dir: s3-access-key s3-secret-key objfs-master-key"
