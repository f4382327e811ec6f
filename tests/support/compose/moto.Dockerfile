# A stand-in S3 service for the compose trial in the tests: moto's server, built locally on the
# tests' Debian 12 base (objfs-test/debian:12-slim, made by scripts/images.sh).
ARG BASE=objfs-test/debian:12-slim
FROM ${BASE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/moto \
    && /opt/moto/bin/pip install --no-cache-dir "moto[s3]==5.2.5" flask==3.1.3 flask-cors==6.0.5
EXPOSE 9000
CMD ["/opt/moto/bin/moto_server", "-H", "0.0.0.0", "-p", "9000"]
