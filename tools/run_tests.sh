#!/usr/bin/env bash
# The whole test suite on CPU (gloo, real multi-process groups). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
exec .venv/bin/python -m pytest tests -q "$@"
