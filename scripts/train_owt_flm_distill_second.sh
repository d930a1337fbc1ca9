#!/usr/bin/env bash
# The paper's FMLM (stage-2 distillation) run on OpenWebText: configs/experiment/owt_flm_distill_second.yaml.
# Usage: bash scripts/train_owt_flm_distill_second.sh [extra hydra overrides]
# Env aliases (read by the configs, not here): DATA_DIR (data.cache_dir), TEACHER_F_PATH (algo.teacher_f_path: FLM), TEACHER_G_PATH (algo.teacher_g_path: stage 1).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/_env.sh
exec python -u -m main +experiment=owt_flm_distill_second "$@"
