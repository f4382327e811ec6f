#!/usr/bin/env bash
# Sets up everything the tests need (Debian packages, .venv) and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check objfs tests benchmarks contrib
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
