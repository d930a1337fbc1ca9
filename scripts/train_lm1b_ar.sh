#!/usr/bin/env bash
# AR on LM1B wrapped: training preset configs/experiment/lm1b_ar.yaml.
# Usage: DATA_DIR=/path/to/cache bash scripts/train_lm1b_ar.sh [extra hydra overrides]
# DATA_DIR: the tokenised-data cache (data.cache_dir); WANDB_MODE: wandb.mode (default offline).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/_env.sh
exec python -u -m main +experiment=lm1b_ar "$@"
