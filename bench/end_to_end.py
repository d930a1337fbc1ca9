"""End-to-end training throughput of `python -m main` against the isolated step; one table.

    python bench/end_to_end.py                 # GPU: the OWT FLM settings on synthetic data
    python bench/end_to_end.py --quick         # CPU smoke run, tiny sizes

Runs `python -m main +experiment=owt_flm` (scripts/train_owt_flm.sh's preset: DiT
small, L=1024, bf16, its checkpoint / validation / logging cadence and loader workers),
compiled, on data=synthetic with data.vocab_size=50258 (V of GPT-2 + [PAD]) for --steps
optimizer steps, per-GPU batch --batch without accumulation (the OWT script accumulates
512 / 32; accumulation only lowers the per-token share of the optimizer step). Extra
Hydra overrides after the options (e.g. trainer.val_check_interval=500) go to main.
Post-training sample printing is off (sampling.print_samples=0): it is not training.

Steady state: the CSV logger (main.py) writes metrics.csv every 100 steps; this
script polls that file and stamps the wall time at which each flush appears, then
divides the tokens between the second and the last stamp by the time between them
(the first 100 steps hold start-up and compile warm-up). Then, in the same
process, bench/train_step.py's step (dspace, compiled, same fused CE) on the same
GPU gives the isolated tokens/s. Target: end-to-end >= 0.95x isolated.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step  # noqa: E402
from common import GPT2_VOCAB, H100_BF16_PEAK, ROOT, device_name, model_config  # noqa: E402

FLUSH_EVERY = 100  # the CSV logger's flush_logs_every_n_steps (Lightning's default)
POLL_S = 0.01  # the stamp of each flush is at most this late


def add_run_options(p: argparse.ArgumentParser, steps: int, quick_steps: int) -> None:
    """The options of the `python -m main` run (this bench's and bench/trace_loop.py's)."""
    p.add_argument("--quick", action="store_true", help="tiny sizes, CPU smoke run")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps ({steps}; quick: {quick_steps})")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch (32; quick: 2)")
    p.add_argument("--vocab", type=int, default=None, help="V (50258; quick: 64)")
    p.add_argument("--length", type=int, default=None, help="L (1024; quick: 16)")
    p.add_argument("--fused-ce", default="auto", help="training.fused_ce")
    p.add_argument("extra", nargs="*", help="more Hydra overrides for main")


def fill_run_options(args, steps: int, quick_steps: int) -> None:
    """Defaults of ``add_run_options`` (the quick CPU sizes with --quick)."""
    args.steps = args.steps or (quick_steps if args.quick else steps)
    args.batch = args.batch or (2 if args.quick else 32)
    args.vocab = args.vocab or (64 if args.quick else GPT2_VOCAB)
    args.length = args.length or (16 if args.quick else 1024)


def owt_overrides(args, run_dir: Path) -> list[str]:
    """scripts/train_owt_flm.sh's preset (+experiment=owt_flm: its validation, checkpoint and
    logging cadence, loader workers) with synthetic data and a bench-sized run."""
    quick = args.quick
    return [
        "+experiment=owt_flm", f"hydra.run.dir={run_dir}",
        "data=synthetic", f"data.vocab_size={args.vocab}",
        *(["model=tiny"] if quick else []), f"model.length={args.length}",
        f"loader.global_batch_size={args.batch}", f"loader.batch_size={args.batch}",
        "sampling.print_samples=0", f"trainer.max_steps={args.steps}",
        *(["trainer.precision=32", "trainer.accelerator=cpu"] if quick else []),
        "wandb.mode=disabled",  # the progress bar stays on, as a user gets it
        f"training.compile={'false' if quick else 'true'}", f"training.fused_ce={args.fused_ce}",
    ] + args.extra


def run_main(args) -> tuple[list[tuple[float, int]], float, Path]:
    """Runs main; returns [(wall time, last step in metrics.csv)] per flush, total seconds."""
    run_dir = Path(tempfile.mkdtemp(prefix="flm-e2e-"))
    cmd = [sys.executable, "-u", "-m", "main"] + owt_overrides(args, run_dir)
    log_path = run_dir / "main.log"
    print("# " + " ".join(cmd), file=sys.stderr, flush=True)
    marks: list[tuple[float, int]] = []
    seen_size = 0
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while proc.poll() is None:
            time.sleep(POLL_S)
            files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
            if not files:
                continue
            size = files[-1].stat().st_size
            if size != seen_size:
                now = time.perf_counter()
                seen_size = size
                step = last_step(files[-1])
                if step is not None and (not marks or step > marks[-1][1]):
                    marks.append((now, step))
    total = time.perf_counter() - start
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # GBs at DiT small; log and CSV stay
    if proc.returncode != 0:
        sys.exit(f"python -m main failed (exit {proc.returncode}); log: {log_path}\n"
                 + log_path.read_text()[-4000:])
    return marks, total, log_path


def last_step(path: Path) -> int | None:
    try:
        with open(path) as f:
            steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("step")]
    except (OSError, ValueError, KeyError):
        return None  # caught mid-write: the next poll reads it whole
    return max(steps) if steps else None


def gpu_steps() -> int:
    """The default --steps on a GPU: the default last.ckpt cadence plus three CSV flushes, so
    one background write at the preset's own cadence falls inside the steady-state window."""
    cadence = OmegaConf.load(ROOT / "configs" / "callbacks" / "checkpoint_last.yaml")
    return cadence.checkpoint_last.every_n_train_steps + 3 * FLUSH_EVERY


BURST = 4  # steps between syncs of the loop-like isolated timing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = gpu_steps()
    add_run_options(p, steps=steps, quick_steps=300)
    p.add_argument("--isolated-steps", type=int, default=10)
    args = p.parse_args()
    fill_run_options(args, steps=steps, quick_steps=300)
    if args.steps < 3 * FLUSH_EVERY:
        sys.exit(f"--steps must be >= {3 * FLUSH_EVERY}: two CSV flushes after the first")
    marks, total, log_path = run_main(args)
    steady = [m for m in marks if m[1] >= 2 * FLUSH_EVERY - 1]
    if len(steady) < 2:
        sys.exit(f"too few metrics.csv flushes seen ({marks}); log: {log_path}")
    (t0, s0), (t1, s1) = steady[0], steady[-1]
    e2e = (s1 - s0) * args.batch * args.length / (t1 - t0)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    model_cfg = model_config("tiny" if args.quick else "small", args.length)
    def isolated_step(variant: str, burst: int) -> dict:
        return train_step.measure(
            model_cfg, args.vocab, variant, args.batch, compiled=not args.quick,
            fused_ce=args.fused_ce, device=device, warmup=3, steps=args.isolated_steps,
            peak_flops=H100_BF16_PEAK, burst=burst)

    def main_over(row: dict) -> float:
        return e2e / row["tokens_per_s"] if not row["oom"] else float("nan")

    # the isolated step timed with a sync after every step, and as a loop runs it (BURST steps
    # between syncs, the host launching ahead): python -m main is held to the faster one
    isolated = {burst: isolated_step("dspace", burst) for burst in (1, BURST)}
    # algo.FLM's own step outside Lightning (seeded noise, antithetic times, EMA update): what
    # of the gap is the production step, what is the loop around it
    module = isolated_step("module", BURST)
    print(f"\nEnd-to-end FLM training, {device_name(device)}, torch {torch.__version__}, "
          f"V={args.vocab}, L={args.length}, B={args.batch}/GPU, model={model_cfg.name}, "
          f"{'fp32 eager' if args.quick else 'bf16 compiled'}, fused_ce={args.fused_ce}")
    print(f"main: {args.steps} steps in {total:.1f} s wall (start-up and compile included); "
          f"steady state between steps {s0} and {s1} "
          f"({(t1 - t0) / (s1 - s0) * 1e3:.1f} ms/step); log {log_path}\n")
    print("| measurement | tokens/s | python -m main / this |")
    print("|---|---|---|")
    faster = max(isolated, key=lambda b: isolated[b].get("tokens_per_s", 0.0))
    for burst, iso in isolated.items():
        how = "a sync after every step" if burst == 1 else f"{burst} steps between syncs"
        target = " (target >= 0.95)" if burst == faster else ""
        print(f"| isolated step (bench/train_step.py, dspace, {iso.get('ce', '?')} CE), {how} | "
              f"{iso.get('tokens_per_s', float('nan')):,.0f} | {main_over(iso):.3f}{target} |")
    print(f"| algo.FLM's step outside Lightning (train_step.py --variants module: seeded noise, "
          f"EMA), {BURST} steps between syncs | {module.get('tokens_per_s', float('nan')):,.0f} | "
          f"{main_over(module):.3f} |")
    print(f"| python -m main, steady state | {e2e:,.0f} | 1.000 |")
    print(f"\npython -m main between consecutive metrics.csv flushes (a dip: a checkpoint write, "
          f"a validation run; each flush stamped by a {POLL_S * 1e3:.0f} ms poll)\n")
    print("| steps | ms/step | tokens/s |")
    print("|---|---|---|")
    for (ta, sa), (tb, sb) in zip(steady, steady[1:]):
        print(f"| {sa}-{sb} | {(tb - ta) / (sb - sa) * 1e3:.1f} | "
              f"{(sb - sa) * args.batch * args.length / (tb - ta):,.0f} |")
    report = log_path.read_text()
    if "Profiler Report" in report:  # trainer.profiler=simple among the overrides
        print("\n" + report[report.index("Profiler Report") - 20:][:6000])


if __name__ == "__main__":
    main()
