#!/usr/bin/env bash
# AR on OpenWebText: training preset configs/experiment/owt_ar.yaml.
# Usage: DATA_DIR=/path/to/cache bash scripts/train_owt_ar.sh [extra hydra overrides]
# DATA_DIR: the tokenised-data cache (data.cache_dir); WANDB_MODE: wandb.mode (default offline).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/_env.sh
exec python -u -m main +experiment=owt_ar "$@"
