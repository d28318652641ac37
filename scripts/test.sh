#!/usr/bin/env bash
# Set everything up, then run the test suite (real Ray, real MLflow store, real data; CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Ray's token authentication stays on: tests/conftest.py gives the session a fresh token (RAY_AUTH_MODE=token)
exec .venv/bin/python -m pytest -q "$@"
