#!/usr/bin/env bash
# Miniature of the paper's step-count table on the exact-likelihood synthetic source:
# FLM, the exact (Bayes-optimal) denoiser, stage-1 and FMLM distilled from FLM and from the
# exact denoiser (distillation alone), and baselines, judged by the oracle; FLM's training
# gap to the exact denoiser (val/gap) as a column and a plot.
#   --size cpu (default): about 40 minutes on a 2-core CPU, with MDLM and AR rows
#   --size quick (or --quick): a few minutes on a CPU (CI: tests/test_synthetic_ladder.py)
#   --size gpu: < 10 minutes on one H100 / H200, 4 stages at a time, steps 1..1024, MDLM and
#               AR rows at FLM's budget
#   bash scripts/synthetic_table.sh --out runs/ladder [--size quick|cpu|gpu] [--jobs N] \
#       [--device cpu|gpu|auto] [--flm-steps N] [--distill-steps N] [--baseline-steps N] \
#       [hydra.overrides=...]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/_env.sh
exec python -u scripts/synthetic_table.py "$@"
