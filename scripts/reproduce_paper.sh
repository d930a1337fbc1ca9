#!/usr/bin/env bash
# Reproduce the paper's headline gen-PPL numbers from its released checkpoints (online machine
# with a GPU): fetch each checkpoint from the Hugging Face Hub (collection david3684/flm-fmlm),
# run our gen PPL under the paper's protocol (scripts/gen_ppl_*.sh, eval.protocol=paper), and
# print our gen PPL / entropy next to the paper's.
#
# Usage: bash scripts/reproduce_paper.sh [--dry-run] [--compare-only] [--out DIR]
#          [--runs "owt_flm owt_fmlm lm1b_flm lm1b_fmlm"] [--num-samples N] [--batch-size B]
#          [-- extra hydra overrides for every run]
#   --dry-run       print the fetch and evaluation commands, run nothing (no network)
#   --compare-only  skip fetching and evaluation; print the table from DIR/<run>/eval/summary.json
#   --num-samples   samples per step count (default 256; the paper's scripts draw 1 or 8 per
#                   call and do not state the count behind the table)
#   --batch-size    samples per sampling batch = one judge call (default 16; the paper's
#                   scripts use 1: a call pads to its longest text, which only adds the first
#                   pad of a row that has no EOS)
# Env: FLM_HF_REPO=<owner/name> names the Hub repository holding the .ckpt files (default:
#      the david3684 model repository that holds each file, found with huggingface_hub);
#      PYTHON (default python); DATA_DIR is not needed (no reference row, no MAUVE).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/_env.sh
PY=${PYTHON:-python}
out=outputs/reproduce_paper
runs="owt_flm owt_fmlm lm1b_flm lm1b_fmlm"
num_samples=256
batch_size=16
dry_run=0
compare_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --compare-only) compare_only=1 ;;
    --out) out=$2; shift ;;
    --runs) runs=$2; shift ;;
    --num-samples) num_samples=$2; shift ;;
    --batch-size) batch_size=$2; shift ;;
    --) shift; break ;;
    *) echo "reproduce_paper.sh: unknown option '$1' (see the header of this script)" >&2; exit 2 ;;
  esac
  shift
done

# run -> released file, our gen_ppl script, the paper's step counts
spec() {
  case "$1" in
    owt_flm) echo "owt_flm.ckpt gen_ppl_owt_flm.sh [1024]" ;;
    owt_fmlm) echo "owt_fmlm.ckpt gen_ppl_owt_flm_distill_second.sh [1,4]" ;;
    lm1b_flm) echo "lm1b_flm.ckpt gen_ppl_lm1b_flm.sh [1024]" ;;
    lm1b_fmlm) echo "lm1b_fmlm.ckpt gen_ppl_lm1b_flm_distill_second.sh [1]" ;;
    *) echo "reproduce_paper.sh: unknown run '$1'; use owt_flm owt_fmlm lm1b_flm lm1b_fmlm" >&2
       return 2 ;;
  esac
}

for run in ${runs}; do spec "${run}" > /dev/null || exit 2; done

fetch_py='
import os, sys
from huggingface_hub import HfApi, hf_hub_download
name = sys.argv[1]
repo = os.environ.get("FLM_HF_REPO")
if not repo:
    api = HfApi()
    repos = [m.id for m in api.list_models(author="david3684")]
    repo = next((r for r in repos if name in api.list_repo_files(r)), None)
    if repo is None:
        sys.exit(f"no david3684 model repository holds {name} (searched {repos}); "
                 "set FLM_HF_REPO=<owner/name>")
print(hf_hub_download(repo_id=repo, filename=name))
'

for run in ${runs}; do
  read -r file script steps <<< "$(spec "${run}")"
  if [ "${compare_only}" = 1 ]; then continue; fi
  if [ "${dry_run}" = 1 ]; then
    echo "fetch: ${PY} -c <hf_hub_download> ${file}  # repo: ${FLM_HF_REPO:-auto (david3684)}"
    ckpt="<${file}>"
  else
    ckpt=$("${PY}" -c "${fetch_py}" "${file}")
  fi
  cmd=(bash "scripts/${script}" "sampling.steps=${steps}" "eval.num_samples=${num_samples}"
       "sampling.batch_size=${batch_size}" "hydra.run.dir=${out}/${run}"
       "eval.output_dir=${out}/${run}/eval" "$@")
  if [ "${dry_run}" = 1 ]; then
    echo "eval: CKPT_PATH=${ckpt} ${cmd[*]}"
  else
    CKPT_PATH="${ckpt}" "${cmd[@]}"
  fi
done
if [ "${dry_run}" = 1 ]; then exit 0; fi

# Ours next to the paper's (README of david3684/flm: gen PPL / entropy under GPT-2 Large).
"${PY}" - "${out}" ${runs} <<'EOF'
import json, os, sys
PAPER = {"owt_flm": {1024: (62.23, 5.33)}, "owt_fmlm": {1: (168.30, 5.17), 4: (111.31, 5.26)},
         "lm1b_flm": {1024: (96.91, 4.29)}, "lm1b_fmlm": {1: (119.34, 4.16)}}
out, runs = sys.argv[1], sys.argv[2:]
print(f"{'run':>10} {'steps':>6} {'protocol':>9} {'N':>5} | {'gen PPL':>8} {'paper':>8} | "
      f"{'entropy':>7} {'paper':>6}")
for run in runs:
    path = os.path.join(out, run, "eval", "summary.json")
    if not os.path.exists(path):
        print(f"{run:>10}  missing: {path}")
        continue
    with open(path) as f:
        summary = json.load(f)
    for row in summary["rows"]:
        ppl, ent = PAPER.get(run, {}).get(row["steps"], (float("nan"), float("nan")))
        print(f"{run:>10} {row['steps']:>6} {summary.get('protocol', '?'):>9} "
              f"{row['num_samples']:>5} | {row['gen_ppl']:>8.2f} {ppl:>8.2f} | "
              f"{row['entropy_mean']:>7.2f} {ent:>6.2f}")
EOF
