#!/usr/bin/env bash
# Stage-2 distillation, FMLM (flm-math §6, §7), on LM1B: one network regressed on the
# stage-1 flow map. DiT small, L=128, global batch 512, boundary_prob 128, bf16, AdamW 3e-4.
# Usage: TEACHER_F_PATH=/path/to/flm.ckpt TEACHER_G_PATH=/path/to/stage1.ckpt \
#          bash scripts/train_lm1b_flm_distill_second.sh [extra hydra overrides]
# trainer.max_steps is not fixed by the paper's description: override it as needed.
set -euo pipefail
: "${TEACHER_F_PATH:?set TEACHER_F_PATH to the FLM checkpoint (algo=flm)}"
: "${TEACHER_G_PATH:?set TEACHER_G_PATH to the stage-1 checkpoint (algo=flm_distill)}"
for path in "${TEACHER_F_PATH}" "${TEACHER_G_PATH}"; do
  case "${path}" in
    *"'"*) echo "error: teacher paths must not contain a single quote: ${path}" >&2; exit 2 ;;
  esac
done

# Paths are single-quoted for Hydra: Lightning names contain '=' (epoch=3-step=100.ckpt).
exec python -u -m main \
  mode=train \
  algo=flm_distill_second \
  "algo.teacher_f_path='${TEACHER_F_PATH}'" \
  "algo.teacher_g_path='${TEACHER_G_PATH}'" \
  model=small \
  model.length=128 \
  data=lm1b-wrap \
  loader.global_batch_size=512 \
  trainer.precision=bf16 \
  trainer.max_steps=100000 \
  "$@"
