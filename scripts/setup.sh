#!/usr/bin/env bash
# Installs what objfs needs on Debian 12 (as root) into ./.venv. Idempotent.
#   scripts/setup.sh          runtime: fuse3, the Debian orthanc package, objfs
#   scripts/setup.sh --test   plus dcmtk and the test/benchmark Python packages
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

apt_packages=(fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev curl orthanc)
[ "$want_test" = 1 ] && apt_packages+=(dcmtk orthanc-python postgresql orthanc-postgresql)
[ "$want_test" = 1 ] && ! command -v npm >/dev/null && apt_packages+=(nodejs npm)
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
# pip's failures must stop the script; only its noise about this image's extra indexes goes.
pip_install() {
    .venv/bin/pip install -q --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "is ignored: it is neither" || true; }
}
pip_install -r requirements.txt
if [ "$want_test" = 1 ]; then
    pip_install -r requirements-test.txt
    # Its own call: a pinned hash turns on require-hashes mode for the whole install.
    pip_install --require-hashes -r requirements-gcs-emulator.txt
    if [ ! -x .cache/node/node_modules/.bin/azurite-blob ]; then
        echo "setup: installing Azurite (npm)"
        npm install --silent --prefix .cache/node --no-audit --no-fund azurite@3.35.0 2>&1 \
            | { grep -v 'Unknown user config "nodedir"' || true; }
    fi
fi
pip_install --no-deps -e .
if [ "$want_test" = 1 ]; then
    # Newer Orthanc releases for the end-to-end matrix (built once, then cached).
    bash scripts/chroots.sh
    # A Docker engine, the objfs image and a moto stand-in built on a local Debian 12 base
    # (cached layers), and Compose v2.
    bash scripts/images.sh
    # A Debian 12 tree with systemd and Debian's orthanc, booted by the systemd tests.
    bash scripts/nspawn-root.sh
fi
# The systemd units (systemd/) run /usr/local/bin/objfs.
ln -sfn "$PWD/.venv/bin/objfs" /usr/local/bin/objfs
.venv/bin/objfs --version
