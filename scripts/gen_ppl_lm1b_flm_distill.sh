#!/usr/bin/env bash
# Step sweep of a stage-1 flow map checkpoint on LM1B: judge gen PPL, entropy, MAUVE.
# Usage: CKPT_PATH=/path/to/last.ckpt bash scripts/gen_ppl_lm1b_flm_distill.sh [extra hydra overrides]
exec bash "$(dirname "$0")/lib/gen_ppl.sh" lm1b-wrap flm_distill 128 "[1,2,4,8]" "$@"
