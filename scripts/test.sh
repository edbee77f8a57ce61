#!/usr/bin/env bash
# README command 2: set up, then run every test: the unit tests and every notebook under nbval (quick mode).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DEQREG_MODE=${DEQREG_MODE:-quick} MPLBACKEND=Agg PLOTLY_RENDERER=json PYTHONHASHSEED=0
# The notebooks' .ipynb files are generated from their py:percent sources; check they agree before running them.
# The JupyterLab + Chromium smoke test (tests/test_browser.py, marked `browser`) takes minutes: it is deselected
# here; run it with `bash scripts/test.sh -m browser tests/test_browser.py` (a later -m replaces this one).
.venv/bin/python -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider -m "not browser" "$@"
