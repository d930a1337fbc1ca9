#!/usr/bin/env bash
# The training entry point (python -m main: Lightning, CUDA, NCCL, bf16, fused AdamW, compiled)
# on a GPU. FLM under strategy=fsdp and ddp: 40 steps straight, and 20 steps continued to 40
# from last.ckpt; prints the final losses and the largest weight differences. Then both
# distillation stages for 10 steps from an FLM teacher, ppl_eval of the FMLM student, and
# bench/scaling.py on the GPUs present. PARTS="flm distill scaling" (default: all) picks the
# parts; FLM_COMPILE=false / DISTILL_COMPILE=false run those parts eager. Writes into ${OUT}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/flm-gpu-check}"
COMMON=(model=small model.length=64 loader.global_batch_size=64 trainer.precision=bf16
        "training.compile=${FLM_COMPILE:-true}" trainer.val_check_interval=20 trainer.limit_val_batches=4
        trainer.enable_progress_bar=false trainer.log_every_n_steps=5 sampling.print_samples=0 wandb.mode=disabled
        callbacks.checkpoint_every_n_steps.every_n_train_steps=10)
run() { local dir="$1"; shift; python -u -m main "${COMMON[@]}" "checkpointing.save_dir=${OUT}/${dir}" \
        "hydra.run.dir=${OUT}/${dir}" "$@" > "${OUT}/${dir}.log" 2>&1 || { tail -40 "${OUT}/${dir}.log"; exit 1; }; }
mkdir -p "${OUT}"
PARTS="${PARTS:-flm distill scaling}"
if [[ " ${PARTS} " == *" flm "* ]]; then
for strategy in fsdp ddp; do
  start=$(date +%s)
  run "${strategy}-40" strategy=${strategy} trainer.max_steps=40
  run "${strategy}-resumed" strategy=${strategy} trainer.max_steps=20
  run "${strategy}-resumed" strategy=${strategy} trainer.max_steps=40
  echo "${strategy}: three runs in $(( $(date +%s) - start )) s"
done
python - "${OUT}" <<'PY'
import sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
ckpt = {name: torch.load(out / name / "checkpoints" / "last.ckpt", map_location="cpu",
                         weights_only=False)
        for name in ("fsdp-40", "fsdp-resumed", "ddp-40", "ddp-resumed")}
def diff(a, b, key="state_dict"):
    return max(float((ckpt[a][key][k].float() - v.float()).abs().max())
               for k, v in ckpt[b][key].items())
for a, b in (("fsdp-40", "fsdp-resumed"), ("ddp-40", "ddp-resumed"), ("fsdp-40", "ddp-40")):
    print(f"max |weight difference| {a} vs {b}: {diff(a, b):.3e}   "
          f"EMA: {max(float((ckpt[a]['ema']['shadow'][k] - v).abs().max()) for k, v in ckpt[b]['ema']['shadow'].items()):.3e}")
for name in ckpt:
    log = (out / name / "csv").glob("**/metrics.csv")
    import csv
    rows = [r for f in log for r in csv.DictReader(open(f))]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    last = f"{train[-1]:.4f}" if train else "-"
    print(f"{name:>13}: step {ckpt[name]['global_step']}, last train/loss {last}, "
          f"val/loss {val}")
PY
fi
if [[ " ${PARTS} " == *" distill "* ]]; then
  start=$(date +%s)
  D=("training.compile=${DISTILL_COMPILE:-true}")
  run teacher "${D[@]}" trainer.max_steps=10
  run distill1 "${D[@]}" algo=flm_distill \
    "algo.teacher_path='${OUT}/teacher/checkpoints/last.ckpt'" trainer.max_steps=10
  run distill2 "${D[@]}" algo=flm_distill_second \
    "algo.teacher_f_path='${OUT}/teacher/checkpoints/last.ckpt'" \
    "algo.teacher_g_path='${OUT}/distill1/checkpoints/last.ckpt'" trainer.max_steps=10
  run ppl "${D[@]}" mode=ppl_eval "eval.checkpoint_path='${OUT}/distill2/checkpoints/last.ckpt'"
  echo "FLM teacher, distillation stages 1 and 2 (10 steps each), ppl_eval: $(( $(date +%s) - start )) s"
  for name in teacher distill1 distill2; do
    echo "${name}: $(grep -c 'checkpoint written' "${OUT}/${name}.log") checkpoint writes," \
         "files: $(ls "${OUT}/${name}/checkpoints" | tr '\n' ' ')"
  done
  grep -h "ppl_eval:" "${OUT}/ppl.log" | tail -1
fi
if [[ " ${PARTS} " == *" scaling "* ]]; then python bench/scaling.py --worlds 1 2 4 8 --steps 20; fi
