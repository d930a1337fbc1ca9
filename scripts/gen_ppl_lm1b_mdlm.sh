#!/usr/bin/env bash
# Generative perplexity of an MDLM checkpoint on LM1B: preset configs/experiment/lm1b_mdlm_gen_ppl.yaml.
# Usage: CKPT_PATH=/path/to/last.ckpt bash scripts/gen_ppl_lm1b_mdlm.sh [extra hydra overrides]
# CKPT_PATH: eval.checkpoint_path; NUM_SAMPLES: eval.num_samples (default 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/_env.sh
exec python -u -m main +experiment=lm1b_mdlm_gen_ppl "$@"
