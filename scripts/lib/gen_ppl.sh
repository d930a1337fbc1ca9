#!/usr/bin/env bash
# Shared body of scripts/gen_ppl_*.sh: a sampling sweep of CKPT_PATH scored by
# the judge (GPT-2 Large by default): gen PPL, entropy, MAUVE, reference row.
# Usage: bash scripts/lib/gen_ppl.sh DATA ALGO LENGTH STEPS [extra hydra overrides]
# Offline: append eval.gen_ppl_eval_model_name_or_path=<dir from scripts/train_judge.py>.
set -euo pipefail
data=$1 algo=$2 length=$3 steps=$4
shift 4
if [ -z "${CKPT_PATH:-}" ]; then
  echo "error: set CKPT_PATH to the checkpoint to evaluate, e.g." >&2
  echo "  CKPT_PATH=outputs/.../checkpoints/last.ckpt bash scripts/gen_ppl_<data>_${algo}.sh" >&2
  exit 2
fi
# CKPT_PATH is single-quoted for Hydra: Lightning names contain '=' (epoch=3-step=100.ckpt).
case "${CKPT_PATH}" in
  *"'"*) echo "error: CKPT_PATH must not contain a single quote: ${CKPT_PATH}" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/../.."
python -u -m main \
  mode=sample_eval \
  "eval.checkpoint_path='${CKPT_PATH}'" \
  data="${data}" \
  algo="${algo}" \
  model.length="${length}" \
  "sampling.steps=${steps}" \
  eval.gen_ppl_eval_model_name_or_path=gpt2-large \
  eval.num_samples="${NUM_SAMPLES:-1000}" \
  "$@"
