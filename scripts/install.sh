#!/usr/bin/env bash
# Installs everything the project needs into the current Python environment.
# On a machine without torch, torch==2.13.0 is installed first (these machines
# hold its CPU wheel locally) so that pip does not pull several GB of CUDA
# wheels; a machine that already has torch keeps its own build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${FLM_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q -r requirements.txt
