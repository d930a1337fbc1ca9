#!/usr/bin/env bash
# Gen PPL / entropy of a stage-1 flow-map distillation checkpoint on LM1B, the paper's protocol and script
# settings: configs/experiment/lm1b_gen_ppl_flm_distill.yaml. Our larger sweep: scripts/gen_ppl_sweep.sh.
# Usage: CKPT_PATH=<checkpoint or Hub id> bash scripts/gen_ppl_lm1b_flm_distill.sh [extra hydra overrides]
# CKPT_PATH is an alias of eval.checkpoint_path (configs/config.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/_env.sh
exec python -u -m main +experiment=lm1b_gen_ppl_flm_distill "$@"
