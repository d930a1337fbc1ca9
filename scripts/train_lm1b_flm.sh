#!/usr/bin/env bash
# FLM on LM1B (bert-base-uncased, wrapped), DiT small, L=128, global batch 512 (flm-math §7).
# Usage: DATA_DIR=/path/to/cache bash scripts/train_lm1b_flm.sh [extra hydra overrides]
set -euo pipefail
: "${DATA_DIR:?set DATA_DIR to the directory holding (or receiving) the tokenised LM1B cache}"
exec python -u -m main \
  loader.global_batch_size=512 \
  loader.batch_size=64 \
  data=lm1b-wrap \
  data.cache_dir="${DATA_DIR}" \
  model=small \
  algo=flm \
  model.length=128 \
  "sampling.steps=[1024]" \
  trainer.max_steps=1000000 \
  trainer.precision=bf16 \
  optim.lr=3e-4 \
  lr_scheduler.num_warmup_steps=2500 \
  trainer.val_check_interval=5000 \
  algo.double_temb=False \
  callbacks.checkpoint_every_n_steps.every_n_train_steps=20000 \
  wandb.mode="${WANDB_MODE:-offline}" \
  "$@"
