#!/usr/bin/env bash
# README command 2: set up, then run every test: the unit tests and every notebook under nbval (quick mode).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DEQREG_MODE=${DEQREG_MODE:-quick} MPLBACKEND=Agg PLOTLY_RENDERER=json PYTHONHASHSEED=0
# The notebooks' .ipynb files are generated from their py:percent sources; check they agree before running them.
.venv/bin/python -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider "$@"
