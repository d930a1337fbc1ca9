#!/usr/bin/env bash
# Step sweep of a FMLM checkpoint on OpenWebText: judge gen PPL, entropy, MAUVE.
# Usage: CKPT_PATH=/path/to/last.ckpt bash scripts/gen_ppl_owt_flm_distill_second.sh [extra hydra overrides]
exec bash "$(dirname "$0")/lib/gen_ppl.sh" openwebtext-split flm_distill_second 1024 "[1,2,4,8]" "$@"
