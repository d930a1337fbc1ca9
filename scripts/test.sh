#!/usr/bin/env bash
# The test command: install into the project's virtual environment (scripts/install.sh), then run
# the whole suite on the CPU with that environment's python.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/_help.sh
bash scripts/install.sh
# shellcheck disable=SC1091
source "${FLM_VENV:-.venv}/bin/activate"  # scripts under test call `python` by name
exec python -m pytest -q "$@"
