#!/usr/bin/env bash
# Makes the container images the tests run, without any image registry: a Debian 12 base made
# with debootstrap (cached in $OBJFS_IMAGES, default /var/cache/objfs-test/images; it carries
# this machine's CA bundle for pip, as PIP_CERT, in case HTTPS goes through a proxy with its
# own CA), then docker/Dockerfile built on it as objfs-test/objfs. Starts Debian's dockerd if
# no Docker engine answers. Exits 0 without images, saying why, when no engine can run here
# (the container tests then skip with that reason).
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${OBJFS_IMAGES:-/var/cache/objfs-test/images}
if ! command -v dockerd >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
fi
command -v debootstrap >/dev/null || apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
if ! docker info >/dev/null 2>&1; then
    echo "images: starting dockerd"
    mkdir -p "$cache"
    nohup dockerd >"$cache/dockerd.log" 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
if ! docker info >/dev/null 2>&1; then
    echo "images: no Docker engine can run here: $(tail -3 "$cache/dockerd.log" | tr '\n' ' ')"
    exit 0
fi
mirror=$(bash "$(dirname "$0")/debian-mirror.sh")
mkdir -p "$cache"
if [ ! -f "$cache/bookworm-root/.objfs-ready" ]; then
    echo "images: debootstrap of a Debian 12 base"
    rm -rf "$cache/bookworm-root"
    debootstrap --variant=minbase bookworm "$cache/bookworm-root" "$mirror" \
        >"$cache/debootstrap.log" 2>&1 || { tail -20 "$cache/debootstrap.log"; exit 1; }
    touch "$cache/bookworm-root/.objfs-ready"
fi
# minbase has no ca-certificates, so no /etc/ssl/certs yet
install -D -m 0644 /etc/ssl/certs/ca-certificates.crt \
    "$cache/bookworm-root/etc/ssl/certs/host-ca-bundle.crt"
if ! docker image inspect objfs-test/debian:12-slim >/dev/null 2>&1; then
    tar -C "$cache/bookworm-root" --exclude=./.objfs-ready -c . \
        | docker import -c 'ENV PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt' - \
          objfs-test/debian:12-slim >/dev/null
fi
docker build -q --build-arg BASE=objfs-test/debian:12-slim -f docker/Dockerfile \
    -t objfs-test/objfs . >/dev/null
docker build -q -f tests/support/compose/moto.Dockerfile -t objfs-test/moto \
    tests/support/compose >/dev/null
if ! docker compose version >/dev/null 2>&1; then
    # Debian 12 has only Compose v1, which rejects today's Compose files: the Go binary of
    # Debian 13's docker-compose package, taken from the trixie chroot (scripts/chroots.sh).
    chroots=${OBJFS_CHROOTS:-/var/cache/objfs-test/chroots}
    if [ -d "$chroots/trixie" ]; then
        chroot "$chroots/trixie" sh -c 'cd /tmp && rm -f docker-compose_*.deb &&
            apt-get download -qq docker-compose' >/dev/null 2>&1 || true
        debs=("$chroots"/trixie/tmp/docker-compose_*.deb)
        deb=${debs[0]}
        if [ -f "$deb" ]; then
            tmp=$(mktemp -d)
            dpkg-deb -x "$deb" "$tmp"
            install -D -m 0755 "$tmp/usr/libexec/docker/cli-plugins/docker-compose" \
                /usr/local/lib/docker/cli-plugins/docker-compose
            rm -rf "$tmp"
        fi
    fi
fi
echo "images: objfs-test/objfs built ($(docker image inspect -f '{{.Size}}' objfs-test/objfs) bytes)"
