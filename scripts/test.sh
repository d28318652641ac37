#!/usr/bin/env bash
# Set everything up, then run the test suite (real Ray, real MLflow store, real data; CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec .venv/bin/python -m pytest -q "$@"
