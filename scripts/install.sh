#!/usr/bin/env bash
# Installs the project into its own virtual environment, the one every script and test uses:
# .venv in the repository (FLM_VENV=<dir> for another place). The environment is made from
# scratch when absent, so a new machine and CI get the same install path and versions:
# torch==2.13.0 (FLM_TORCH_VERSION to change it; on these machines a local CPU wheel, elsewhere
# PyPI's build, which uses a GPU when there is one), then requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/_help.sh
VENV=${FLM_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "install: creating the virtual environment $VENV" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q "torch==${FLM_TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q -r requirements.txt
"$VENV/bin/python" -c "import torch; print(f'install: torch {torch.__version__} in $VENV, '
                                           f'CUDA available: {torch.cuda.is_available()}')" >&2
