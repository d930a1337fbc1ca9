#!/usr/bin/env bash
# Miniature of the paper's step-count table on the exact-likelihood synthetic source:
# FLM, the exact (Bayes-optimal) denoiser, stage-1 and FMLM distilled from FLM and from the
# exact denoiser (distillation alone), and baselines, judged by the oracle; FLM's training
# gap to the exact denoiser (val/gap) as a column and a plot.
#   --size cpu (default): about 30 minutes on a 2-core CPU
#   --size quick (or --quick): a few minutes on a CPU (CI: tests/test_synthetic_ladder.py)
#   --size gpu: under 10 minutes on one H100, steps 1..1024, rows for algo=mdlm / algo=ar
#               when algo.ALGORITHMS has them
#   bash scripts/synthetic_table.sh --out runs/ladder [--size quick|cpu|gpu] \
#       [--device cpu|gpu|auto] [--flm-steps N] [--distill-steps N] [hydra.overrides=...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -u scripts/synthetic_table.py "$@"
