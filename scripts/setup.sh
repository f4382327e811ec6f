#!/usr/bin/env bash
# Installs what objfs needs on Debian 12 (as root) into ./.venv. Idempotent.
#   scripts/setup.sh          runtime: fuse3, the Debian orthanc package, objfs
#   scripts/setup.sh --test   plus dcmtk and the test/benchmark Python packages
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

apt_packages=(fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev curl orthanc)
[ "$want_test" = 1 ] && apt_packages+=(dcmtk)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d keeps the packaged orthanc service from starting on the default storage.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt 2>&1 \
    | grep -v "is ignored: it is neither" || true
if [ "$want_test" = 1 ]; then
    .venv/bin/pip install -q --disable-pip-version-check -r requirements-test.txt 2>&1 \
        | grep -v "is ignored: it is neither" || true
fi
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e . 2>&1 \
    | grep -v "is ignored: it is neither" || true
.venv/bin/objfs --version
