#!/usr/bin/env bash
# Stage-1 flow-map distillation (flm-math §5, §7) of a frozen FLM teacher on LM1B:
# DiT small, L=128, global batch 128, boundary_prob 64, bf16, AdamW 3e-4, EMA 0.9999.
# Usage: TEACHER_PATH=/path/to/flm.ckpt bash scripts/train_lm1b_flm_distill.sh [extra hydra overrides]
# trainer.max_steps is not fixed by the paper's description: override it as needed.
set -euo pipefail
: "${TEACHER_PATH:?set TEACHER_PATH to the FLM checkpoint (algo=flm) to distil}"
case "${TEACHER_PATH}" in
  *"'"*) echo "error: TEACHER_PATH must not contain a single quote: ${TEACHER_PATH}" >&2; exit 2 ;;
esac

# Paths are single-quoted for Hydra: Lightning names contain '=' (epoch=3-step=100.ckpt).
exec python -u -m main \
  mode=train \
  algo=flm_distill \
  "algo.teacher_path='${TEACHER_PATH}'" \
  model=small \
  model.length=128 \
  data=lm1b-wrap \
  loader.global_batch_size=128 \
  trainer.precision=bf16 \
  trainer.max_steps=100000 \
  "$@"
