#!/usr/bin/env bash
# Miniature of the paper's step-count table on the exact-likelihood synthetic source:
# FLM at 1..256 steps, its stage-1 flow map and FMLM at 1..8 steps, judged by the oracle.
# Defaults fit a 2-core CPU in about 30 minutes; --quick takes 2-3 minutes.
#   bash scripts/synthetic_table.sh --out runs/ladder [--quick] [--device cpu|gpu|auto] \
#       [--flm-steps N] [--distill-steps N] [hydra.overrides=...]
set -euo pipefail
cd "$(dirname "$0")/.."
python -u scripts/synthetic_table.py "$@"
