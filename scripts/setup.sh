#!/usr/bin/env bash
# Create .venv (once) and install deqreg_lite with its notebook and test extras.
# torch is installed first and pinned, so that pip never swaps it for another build:
#   - here (CPU machines), `pip install torch==2.13.0` takes the local CPU wheel;
#   - on a GPU machine with internet, the same pin takes the CUDA build from PyPI.
# Set DEQREG_TORCH to change the pin (e.g. DEQREG_TORCH="torch==2.5.1"), or DEQREG_VENV to use another folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DEQREG_VENV:-.venv}
TORCH=${DEQREG_TORCH:-torch==2.13.0}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# tests/test_browser.py drives Debian's chromium with Playwright (`playwright install` cannot download browsers
# here): with DEQREG_BROWSER=1, install the system package when it is missing (as root, with apt-get). CI skips the
# browser test (it takes minutes on 2 cores), so it does not install chromium either.
if [ "${DEQREG_BROWSER:-0}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
      >/dev/null || echo "[setup] warning: chromium could not be installed; tests/test_browser.py will skip"
  else
    echo "[setup] chromium is missing: install it (e.g. apt-get install chromium) to run tests/test_browser.py"
  fi
fi
stamp="$VENV/.deqreg_setup_stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $TORCH"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "[setup] installing $TORCH"
"$VENV/bin/python" -m pip install -q "$TORCH" 2>&1 | grep -v "is ignored: it is neither" || true
echo "$TORCH" > "$VENV/.torch-constraint"
echo "[setup] installing deqreg_lite[notebooks,test]"
"$VENV/bin/python" -m pip install -q -c "$VENV/.torch-constraint" -e ".[notebooks,test]" 2>&1 \
  | grep -v "is ignored: it is neither" || true
"$VENV/bin/python" -c "import torch, deqreg_lite; print('[setup] torch', torch.__version__, '| cuda:', torch.cuda.is_available())"
echo "$want" > "$stamp"
