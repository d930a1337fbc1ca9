#!/usr/bin/env bash
# MDLM: training preset configs/experiment/owt_mdlm.yaml.
# Usage: DATA_DIR=/path/to/cache bash scripts/train_owt_mdlm.sh [extra hydra overrides]
# DATA_DIR: the tokenised-data cache (data.cache_dir); WANDB_MODE: wandb.mode (default offline).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -u -m main +experiment=owt_mdlm "$@"
