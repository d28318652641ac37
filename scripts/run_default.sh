#!/usr/bin/env bash
# Set everything up, then run the default experiment (conf/default.yaml) and write results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hpmkd run conf/default.yaml --output results.json "$@"
