#!/usr/bin/env bash
# Generative perplexity (judge: GPT-2 Large), entropy and MAUVE step sweep of a
# stage-1 distilled flow map (1, 2, 4, 8 steps) checkpoint on LM1B.
# Usage: CKPT_PATH=/path/to/checkpoint.ckpt bash scripts/gen_ppl_lm1b_flm_distill.sh [extra hydra overrides]
# Offline: append eval.gen_ppl_eval_model_name_or_path=<dir from scripts/train_judge.py>.
set -euo pipefail
# CKPT_PATH is single-quoted for Hydra: Lightning names contain '=' (epoch=3-step=100.ckpt).

if [ -z "${CKPT_PATH:-}" ]; then
  echo "error: set CKPT_PATH to the checkpoint to evaluate, e.g." >&2
  echo "  CKPT_PATH=outputs/.../checkpoints/last.ckpt bash scripts/gen_ppl_lm1b_flm_distill.sh" >&2
  exit 2
fi
case "${CKPT_PATH}" in
  *"'"*) echo "error: CKPT_PATH must not contain a single quote: ${CKPT_PATH}" >&2; exit 2 ;;
esac

python -u -m main \
  mode=sample_eval \
  "eval.checkpoint_path='${CKPT_PATH}'" \
  data=lm1b-wrap \
  algo=flm_distill \
  model.length=128 \
  "sampling.steps=[1,2,4,8]" \
  eval.gen_ppl_eval_model_name_or_path=gpt2-large \
  eval.num_samples="${NUM_SAMPLES:-1000}" \
  "$@"
