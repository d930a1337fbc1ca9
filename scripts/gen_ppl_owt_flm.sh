#!/usr/bin/env bash
# Step sweep of a FLM (Euler) checkpoint on OpenWebText: judge gen PPL, entropy, MAUVE.
# Usage: CKPT_PATH=/path/to/last.ckpt bash scripts/gen_ppl_owt_flm.sh [extra hydra overrides]
exec bash "$(dirname "$0")/lib/gen_ppl.sh" openwebtext-split flm 1024 "[1,2,4,8,16,32,64,128,256,512,1024]" "$@"
