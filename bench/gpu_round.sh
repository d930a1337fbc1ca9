#!/usr/bin/env bash
# One GPU session's measurements, stage by stage; each stage's log lands in $OUT as it ends (a
# call killed at its time limit still returns the finished stages). STAGES picks them:
#   attention   bench/attention_check.py (soft-capped attention vs float64)
#   train       bench/train_step.py, compiled, B = 32 and 64, training.fused_ce=$FUSED_CE
#   variants    bench/train_step.py at B = 32 (dspace) once per ';'-separated argument list of
#               TRAIN_VARIANTS, each in its own process with empty compile caches (so the
#               first-step column is a cold start's compile, as a new user's first run)
#   quickcpu    the CPU quickstart preset pinned to 2 cores for QS_STEPS steps (steps/s)
#   quickgpu    scripts/quickstart.sh's GPU preset through python -m main
#   sampling    bench/sampling_step.py
#   distill     bench/distill_step.py
#   e2e         bench/end_to_end.py
#   coldstart   bench/cold_start.py: python -m main's first optimizer step, cold then warm
#               compile cache, with dynamo's breakdown (first in a fresh machine's call)
#   cudatests   the tests marked cuda (pytest -m cuda; pytest travels in .whl/)
#   trace       bench/trace_loop.py (where the GPU waits inside python -m main; TRACE_ARGS)
#   vocab       bench/vocab_align.py (the V-sized products at V = 50,258 and padded)
#   components  bench/components.py (attention and output layer + CE, each way we can run them)
#   profile     bench/profile_step.py for each task of PROFILE_TASKS (default: train stage1 fmlm)
#   ladder      scripts/synthetic_table.sh --size gpu, cut at LADDER_TIMEOUT s (default 530): the
#               table (partial when cut), its plots, the timing and FLM's metrics.csv to $OUT
#   budgets     scripts/synthetic_table.py --size gpu --budgets ${BUDGETS:-1000,2000}, cut at
#               LADDER_TIMEOUT s: the budget table and each budget's table to $OUT
#   calib       the GPU ladder at LADDER_CALIB steps (timing of every stage), with prep beside it
#   prep        bench/prepare_data_speed.py: OWT stand-in on 1 / 4 / 8 worker processes
# TRAIN_ARGS, SAMPLING_ARGS, DISTILL_ARGS, E2E_ARGS: extra arguments of those benches.
# Run directories go to /tmp/runs; only logs (at most 8 files) go to $OUT. Wheels the machine
# lacks (hydra-core, omegaconf, antlr4, datasets) travel in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/flm-gpu-round}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGES="${STAGES:-attention train}"
stage() { local name="$1"; shift; local t0; t0=$(date +%s)
  echo "== $name: $*"; "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s"; tail -n "${TAIL:-25}" "$OUT/$name.log"; }
if [[ " $STAGES " == *" quickcpu "* ]]; then  # on cores 0-1 beside the GPU stages (cores 2-)
  stage quickcpu env CUDA_VISIBLE_DEVICES= taskset -c 0,1 python -u -m main \
    +experiment=quickstart_cpu trainer.max_steps="${QS_STEPS:-300}" trainer.val_check_interval=150 \
    sampling.steps=[128] trainer.enable_progress_bar=false "hydra.run.dir=/tmp/runs/quickcpu" &
  taskset -cp 2-"$(( $(nproc) - 1 ))" $$ > /dev/null
fi
for s in $STAGES; do
  case "$s" in
    attention) stage attention python bench/attention_check.py ;;
    train) stage "train${TRAIN_TAG:-}" python bench/train_step.py --modes compiled --fused-ce "${FUSED_CE:-auto}" \
        ${TRAIN_ARGS:-} ;;
    variants) i=0; IFS=';' read -ra variants <<< "${TRAIN_VARIANTS:-}"
      for v in "${variants[@]}"; do i=$((i + 1)); rm -rf "/tmp/cache_$i"
        # shellcheck disable=SC2086  # each variant is a list of arguments
        stage "train_v$i" env TORCHINDUCTOR_CACHE_DIR="/tmp/cache_$i/inductor" \
          TRITON_CACHE_DIR="/tmp/cache_$i/triton" python bench/train_step.py --modes compiled \
          --batches 32 --variants dspace --fused-ce "${FUSED_CE:-auto}" $v; done ;;
    quickcpu) ;;  # started above
    quickgpu) stage quickgpu python -u -m main +experiment=quickstart_gpu \
        trainer.enable_progress_bar=false "hydra.run.dir=/tmp/runs/quickgpu" ;;
    sampling) stage sampling python bench/sampling_step.py ${SAMPLING_ARGS:-} ;;
    distill) stage distill python bench/distill_step.py --modes compiled ${DISTILL_ARGS:-} ;;
    e2e) stage e2e python bench/end_to_end.py ${E2E_ARGS:-} ;;
    coldstart) TAIL=40 stage coldstart python bench/cold_start.py --breakdown ;;
    cudatests) stage cudatests python -m pytest -q -p no:cacheprovider -rs -m cuda tests/ ;;
    trace) TAIL=80 stage trace python bench/trace_loop.py ${TRACE_ARGS:-} ;;
    vocab) stage vocab python bench/vocab_align.py ;;
    components) stage components python bench/components.py ${COMPONENTS_ARGS:-} ;;
    profile) for task in ${PROFILE_TASKS:-train stage1 fmlm}; do
        TAIL=60 stage "profile_$task" python bench/profile_step.py --task "$task"; done ;;
    ladder) L=/tmp/runs/ladder
      stage ladder timeout "${LADDER_TIMEOUT:-530}" bash scripts/synthetic_table.sh --size gpu \
        --out "$L" ${LADDER_ARGS:-}
      for f in table.md table.json oracle_nll_vs_steps.png gap_vs_t.png; do
        [ -f "$L/$f" ] && cp "$L/$f" "$OUT/ladder_$f"; done
      cp "$(ls "$L"/flm/csv/version_*/metrics.csv | tail -n 1)" "$OUT/ladder_flm_metrics.csv"
      python bench/ladder_timing.py "$L" > "$OUT/ladder_timing.txt" 2>&1
      cat "$OUT/ladder_timing.txt" ;;
    budgets) B=/tmp/runs/budgets
      stage budgets timeout "${LADDER_TIMEOUT:-530}" python scripts/synthetic_table.py --size gpu \
        --out "$B" --budgets "${BUDGETS:-1000,2000}" ${LADDER_ARGS:-}
      for f in "$B"/budget_table.md "$B"/budget_table.json "$B"/oracle_nll_vs_budget.png \
          "$B"/budget_*/table.md; do
        [ -f "$f" ] && cp "$f" "$OUT/budgets_$(basename "$(dirname "$f")")_$(basename "$f")"; done ;;
    calib) # the prep bench on cores 8-15 beside the ladder on cores 0-7
      taskset -c 8-15 python bench/prepare_data_speed.py --corpus owt --num-docs "${PREP_DOCS:-2000}" \
        --num-proc 1 4 8 --out "$OUT/prep_owt.json" > "$OUT/prep.log" 2>&1 &
      stage calib taskset -c 0-7 bash scripts/synthetic_table.sh --size gpu --out /tmp/runs/calib \
        ${LADDER_CALIB:---flm-steps 200 --distill-steps 50 --baseline-steps 200}
      python bench/ladder_timing.py /tmp/runs/calib > "$OUT/calib_timing.txt" 2>&1; wait ;;
    prep) stage prep python bench/prepare_data_speed.py --corpus owt --num-docs "${PREP_DOCS:-2000}" \
        --num-proc 1 4 8 16 --out "$OUT/prep_owt.json" ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
wait
