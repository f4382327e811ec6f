#!/usr/bin/env bash
# Sets up everything the tests need (Debian packages, .venv) and runs the whole suite:
# lint (ruff), types (mypy --strict over objfs/), the layer contracts (import-linter), pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check objfs tests benchmarks contrib
.venv/bin/mypy
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
