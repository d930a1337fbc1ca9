#!/usr/bin/env bash
# Newcomer's first command: install into the project's virtualenv (scripts/install.sh), then train
# FLM on the embedded Shakespeare corpus (no network) and print samples before and after training,
# with the validation loss next to the uniform baseline log V. Without a GPU: a tiny DiT for a few
# minutes on the CPU (configs/experiment/quickstart_cpu.yaml); with one: a larger DiT, bf16,
# compiled (quickstart_gpu.yaml). Extra Hydra overrides are passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/_help.sh
bash scripts/install.sh
# shellcheck disable=SC1091
source "${FLM_VENV:-.venv}/bin/activate"
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  preset=quickstart_gpu
else
  preset=quickstart_cpu
fi
echo "quickstart: +experiment=$preset" >&2
exec python -u -m main +experiment="$preset" "$@"
