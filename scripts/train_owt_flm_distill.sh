#!/usr/bin/env bash
# The paper's stage-1 flow-map distillation run on OpenWebText: configs/experiment/owt_flm_distill.yaml.
# Usage: bash scripts/train_owt_flm_distill.sh [extra hydra overrides]
# Env aliases (read by the configs, not here): DATA_DIR (data.cache_dir), TEACHER_PATH (algo.teacher_path: the FLM checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/_env.sh
exec python -u -m main +experiment=owt_flm_distill "$@"
