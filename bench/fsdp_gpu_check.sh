#!/usr/bin/env bash
# strategy=fsdp on one GPU through the real entry point (Lightning, CUDA, NCCL, bf16, compiled
# blocks): train 40 steps, continue a 20-step run to 40 from its last.ckpt, and the same under
# ddp; print the final train/val losses and the largest weight differences. Then
# bench/scaling.py on the GPUs present (ddp and fsdp). Writes into ${OUT:-/tmp/fsdp-check}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fsdp-check}"
COMMON=(model=small model.length=64 loader.global_batch_size=64 trainer.precision=bf16
        training.compile=true trainer.val_check_interval=20 trainer.limit_val_batches=4
        trainer.enable_progress_bar=false trainer.log_every_n_steps=5 sampling.print_samples=0 wandb.mode=disabled
        callbacks.checkpoint_every_n_steps.every_n_train_steps=10)
run() { local dir="$1"; shift; python -u -m main "${COMMON[@]}" "checkpointing.save_dir=${OUT}/${dir}" \
        "hydra.run.dir=${OUT}/${dir}" "$@" > "${OUT}/${dir}.log" 2>&1 || { tail -40 "${OUT}/${dir}.log"; exit 1; }; }
mkdir -p "${OUT}"
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
if [[ "${SCALING:-1}" == 1 ]]; then python bench/scaling.py --worlds 1 2 4 8 --steps 20; fi
