"""How long `python -m main` takes to its first optimizer step, cold and warm; one table.

    python bench/cold_start.py                    # GPU: the OWT FLM preset, compiled
    python bench/cold_start.py --quick            # CPU smoke run (tiny, eager)

Each row is one `python -m main +experiment=owt_flm` process (scripts/train_owt_flm.sh's
preset: DiT small, L = 1,024, global batch 512 in micro-batches of --batch, i.e. 16
micro-batches per optimizer step on one GPU) on data=synthetic with V = 50,258, stopped
after one optimizer step. The time is the process's own log line "first optimizer step ...
done X s after the process started" (runtime/monitoring.TrainingReport: interpreter start,
imports, data, model, compilation, autotuning and the step's micro-batches).

* cold: ``training.compile_cache`` an empty directory (no compiled graph, kernel or
  autotuning result to reuse). The very first process of a fresh machine is also cold in
  the OS's file cache (torch's libraries read from disk), which no setting changes: the
  table says which row was first;
* warm: the same directory again, as a restarted (requeued) run on the same machine, or on
  any machine that sees the directory, finds it.

Each row is printed as soon as its process ends (a run cut short keeps the rows it
finished); with --breakdown, dynamo's per-phase compile times of the process follow it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from settings import GPT2_VOCAB, ROOT, inductor_options  # noqa: E402

FIRST_STEP = re.compile(r"first optimizer step \(step \d+\) done ([0-9.]+) s after the process "
                        r"started, ([0-9.]+) s after training started")
STEADY = re.compile(r"after the first step: (\d+) optimizer steps? in ([0-9.]+) s \(([0-9.]+) ms "
                    r"per step")
# `python -m main` with inductor options over speed.compile.compile_options() (--inductor) and
# dynamo's compile times printed at exit (--breakdown)
ENTRY = ("import atexit, runpy, sys\n"
         "OPTIONS, BREAKDOWN = {options!r}, {breakdown!r}\n"
         "if OPTIONS:\n"
         "    import speed.compile as c\n"
         "    base = c.compile_options\n"
         "    c.compile_options = lambda extra=None: {{**(base(extra) or {{}}), **OPTIONS}}\n"
         "def times():\n"
         "    import torch._dynamo.utils as u\n"
         "    print('COMPILE TIMES\\n' + u.compile_times(repr='str', aggregate=True),\n"
         "          file=sys.stderr)\n"
         "if BREAKDOWN:\n"
         "    atexit.register(times)\n"
         "runpy.run_module('main', run_name='__main__', alter_sys=True)\n")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, eager, CPU smoke run")
    p.add_argument("--order", default="cold,warm",
                   help="cache states, in order (cold: a new directory; warm: the last one "
                        "again)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (32; quick: 2)")
    p.add_argument("--breakdown", action="store_true", help="dynamo's compile times per run")
    p.add_argument("--steps", type=int, default=1,
                   help="optimizer steps per run; above 1 the table adds the steps after the "
                        "first (ms per step, python -m main's own end-of-training line)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="an inductor option over speed.compile.compile_options() (e.g. "
                        "max_autotune=false)")
    p.add_argument("extra", nargs="*", help="more Hydra overrides for main")
    args = p.parse_args()
    args.batch = args.batch or (2 if args.quick else 32)
    if args.steps < 1:
        p.error(f"--steps {args.steps}: at least 1")
    args.options = inductor_options(args.inductor)
    return args


def overrides(args, run_dir: Path, cache: Path) -> list[str]:
    quick = args.quick
    return ["+experiment=owt_flm", f"hydra.run.dir={run_dir}", "data=synthetic",
            f"data.vocab_size={64 if quick else GPT2_VOCAB}",
            *(["model=tiny", "model.length=16", "loader.global_batch_size=4",
               "trainer.precision=32", "trainer.accelerator=cpu"] if quick else []),
            f"loader.batch_size={args.batch}", f"trainer.max_steps={args.steps}",
            "sampling.print_samples=0", "wandb.mode=disabled",
            f"training.compile={'false' if quick else 'true'}",
            f"training.compile_cache={cache}",
            *args.extra]


def run_once(args, cache: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="flm-cold-"))
    main_args = overrides(args, run_dir, cache)
    if args.breakdown or args.options:
        entry = ["-c", ENTRY.format(options=args.options, breakdown=args.breakdown)]
        shown = ["-c", f"<main with inductor options {args.options}, breakdown {args.breakdown}>"]
    else:
        entry = shown = ["-m", "main"]
    print("# " + " ".join([sys.executable, *shown, *main_args]), file=sys.stderr, flush=True)
    cmd = [sys.executable, *entry, *main_args]
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    (run_dir / "main.log").write_text(log)
    found = FIRST_STEP.search(log)
    if proc.returncode != 0 or not found:  # reported in the table; the other rows still run
        print(f"python -m main failed (exit {proc.returncode}) or logged no first step; log: "
              f"{run_dir / 'main.log'}\n{log[-4000:]}", file=sys.stderr, flush=True)
        return {"failed": f"exit {proc.returncode}", "wall_s": wall, "times": ""}
    times = log[log.index("COMPILE TIMES"):] if "COMPILE TIMES" in log else ""
    steady = STEADY.search(log)
    return {"first_step_s": float(found[1]), "training_s": float(found[2]), "wall_s": wall,
            "step_ms": f"{float(steady[3]):.1f}" if steady else "", "times": times}


def main() -> None:
    args = parse_args()
    order = args.order.split(",")
    if set(order) - {"cold", "warm"}:
        sys.exit(f"--order {args.order}: cold and/or warm")
    print(f"First optimizer step of python -m main +experiment=owt_flm (data=synthetic), "
          f"micro-batch {args.batch}, training.compile={not args.quick}; rows in the order run "
          f"(the first is the machine's first process)"
          + (f"; inductor options {args.options}" if args.options else "") + "\n", flush=True)
    print("| # | compile cache | first step, s after process start | of which after training "
          "started | ms per step after the first | process wall s |")
    print("|---|---|---|---|---|---|", flush=True)
    cache = Path(tempfile.mkdtemp(prefix="flm-cache-"))
    for k, state in enumerate(order, 1):
        if state == "cold" and k > 1:
            cache = Path(tempfile.mkdtemp(prefix="flm-cache-"))
        r = run_once(args, cache)
        if "failed" in r:
            print(f"| {k} | {state} | failed ({r['failed']}) | | | {r['wall_s']:.1f} |",
                  flush=True)
            continue
        print(f"| {k} | {state} | {r['first_step_s']:.1f} | {r['training_s']:.1f} | "
              f"{r['step_ms']} | {r['wall_s']:.1f} |", flush=True)
        if r["times"]:
            print(f"\n<!-- row {k} ({state}) -->\n```\n{r['times'][:4000]}\n```\n", flush=True)
    import torch  # after the runs: importing it first would warm the OS file cache for row 1

    print(f"\n{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
