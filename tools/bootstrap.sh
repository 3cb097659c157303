#!/usr/bin/env bash
# Create ./.venv (once) and install mindlora with its test extras into it, idempotently.
# torch is installed first and pinned, so pip never swaps a local CPU build for a CUDA download.
# Override: PYTHON=python3.11, TORCH_SPEC="torch==2.13.0", MINDLORA_VENV=.venv,
# MINDLORA_EXTRAS=test,quickstart (the setup.py extras to install; default: test).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${MINDLORA_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${MINDLORA_EXTRAS:-test}
stamp="$VENV/.mindlora-installed"
want="$(cat setup.py tools/bootstrap.sh | sha256sum | cut -c1-16) $TORCH_SPEC [$EXTRAS]"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
echo "$want" > "$stamp"
echo "mindlora installed into $VENV"
