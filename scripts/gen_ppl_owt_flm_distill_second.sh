#!/usr/bin/env bash
# Gen PPL / entropy of a FMLM (stage-2 distillation) checkpoint on OpenWebText, the paper's protocol and script
# settings: configs/experiment/owt_gen_ppl_flm_distill_second.yaml. Our larger sweep: scripts/gen_ppl_sweep.sh.
# Usage: CKPT_PATH=<checkpoint or Hub id> bash scripts/gen_ppl_owt_flm_distill_second.sh [extra hydra overrides]
# CKPT_PATH is an alias of eval.checkpoint_path (configs/config.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/_env.sh
exec python -u -m main +experiment=owt_gen_ppl_flm_distill_second "$@"
