#!/usr/bin/env bash
# Generative perplexity (judge: GPT-2 Large), entropy and MAUVE step sweep of a
# FLM (Euler, 1..1024 steps) checkpoint on OpenWebText.
# Usage: CKPT_PATH=/path/to/checkpoint.ckpt bash scripts/gen_ppl_owt_flm.sh [extra hydra overrides]
# Offline: append eval.gen_ppl_eval_model_name_or_path=<dir from scripts/train_judge.py>.
set -euo pipefail
# CKPT_PATH is single-quoted for Hydra: Lightning names contain '=' (epoch=3-step=100.ckpt).

if [ -z "${CKPT_PATH:-}" ]; then
  echo "error: set CKPT_PATH to the checkpoint to evaluate, e.g." >&2
  echo "  CKPT_PATH=outputs/.../checkpoints/last.ckpt bash scripts/gen_ppl_owt_flm.sh" >&2
  exit 2
fi
case "${CKPT_PATH}" in
  *"'"*) echo "error: CKPT_PATH must not contain a single quote: ${CKPT_PATH}" >&2; exit 2 ;;
esac

python -u -m main \
  mode=sample_eval \
  "eval.checkpoint_path='${CKPT_PATH}'" \
  data=openwebtext-split \
  algo=flm \
  model.length=1024 \
  "sampling.steps=[1,2,4,8,16,32,64,128,256,512,1024]" \
  eval.gen_ppl_eval_model_name_or_path=gpt2-large \
  eval.num_samples="${NUM_SAMPLES:-1000}" \
  "$@"
