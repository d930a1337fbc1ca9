#!/usr/bin/env bash
# FLM on OpenWebText, DiT small, L=1024, global batch 512 (flm-math §7).
# Usage: DATA_DIR=/path/to/cache bash scripts/train_owt_flm.sh [extra hydra overrides]
set -euo pipefail
: "${DATA_DIR:?set DATA_DIR to the directory holding (or receiving) the tokenised OpenWebText cache}"
exec python -u -m main \
  loader.global_batch_size=512 \
  loader.batch_size=32 \
  data=openwebtext-split \
  data.cache_dir="${DATA_DIR}" \
  model=small \
  algo=flm \
  model.length=1024 \
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
