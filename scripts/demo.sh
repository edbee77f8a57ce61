#!/usr/bin/env bash
# README command 1: set up, then run the main job (classical registration of the shipped 2D brain pair).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m deqreg_lite demo "$@"
