#!/usr/bin/env bash
# Newcomer's first command: install everything, then train a tiny FLM on the
# embedded Shakespeare corpus on the CPU (a few minutes, no network, no GPU)
# and print a handful of samples. Extra Hydra overrides are passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -u -m main \
  trainer.max_steps="${QUICKSTART_STEPS:-400}" \
  lr_scheduler.num_warmup_steps=50 \
  optim.lr=1e-3 \
  training.ema=0.99 \
  trainer.val_check_interval=200 \
  sampling.steps=[64] \
  "$@"
