#!/usr/bin/env bash
# Our larger gen-PPL sweep, on top of a paper preset (configs/experiment/<DATA>_gen_ppl_<ALGO>.yaml):
# 1,000 samples in batches of 8, a step sweep, the held-out reference row and MAUVE. The
# protocol stays the paper's; append eval.protocol=clean for ours (evaluation/protocol.py).
# Usage: CKPT_PATH=<checkpoint or Hub id> bash scripts/gen_ppl_sweep.sh RUN [extra hydra overrides]
#   RUN: owt_flm | owt_flm_distill | owt_flm_distill_second | lm1b_flm | lm1b_flm_distill |
#        lm1b_flm_distill_second. The reference row and MAUVE need the dataset (DATA_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/_env.sh
run=${1:-}
case "${run}" in
  owt_flm | lm1b_flm) steps="[1,2,4,8,16,32,64,128,256,512,1024]" ;;
  owt_flm_distill | lm1b_flm_distill | owt_flm_distill_second | lm1b_flm_distill_second)
    steps="[1,2,4,8,16,32]" ;;
  *) echo "usage: bash scripts/gen_ppl_sweep.sh {owt,lm1b}_{flm,flm_distill,flm_distill_second}" \
          "[overrides] (got '${run}')" >&2; exit 2 ;;
esac
shift
exec python -u -m main "+experiment=${run%%_*}_gen_ppl_${run#*_}" \
  "sampling.steps=${steps}" eval.num_samples=1000 sampling.batch_size=8 \
  eval.reference_row=true eval.compute_mauve=true "$@"
