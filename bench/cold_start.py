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

--scopes: ``training.compile_scope`` values (whole: the network's forward compiled as one
graph; blocks: each DiT block compiled on its own, once for all blocks). With
--breakdown, dynamo's per-phase compile times of each process are printed after the table.
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

from common import GPT2_VOCAB, ROOT  # noqa: E402

FIRST_STEP = re.compile(r"first optimizer step \(step \d+\) done ([0-9.]+) s after the process "
                        r"started, ([0-9.]+) s after training started")
# `python -m main` with dynamo's compile times printed at exit (--breakdown)
WITH_TIMES = ("import atexit, runpy, sys\n"
              "def times():\n"
              "    import torch._dynamo.utils as u\n"
              "    print('COMPILE TIMES\\n' + u.compile_times(repr='str', aggregate=True),\n"
              "          file=sys.stderr)\n"
              "atexit.register(times)\n"
              "runpy.run_module('main', run_name='__main__', alter_sys=True)\n")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, eager, CPU smoke run")
    p.add_argument("--scopes", default="whole,blocks", help="training.compile_scope values")
    p.add_argument("--order", default="cold,warm",
                   help="cache states per scope, in order (cold: a new directory; warm: the "
                        "scope's directory again)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (32; quick: 2)")
    p.add_argument("--breakdown", action="store_true", help="dynamo's compile times per run")
    p.add_argument("extra", nargs="*", help="more Hydra overrides for main")
    args = p.parse_args()
    args.batch = args.batch or (2 if args.quick else 32)
    return args


def overrides(args, run_dir: Path, cache: Path, scope: str) -> list[str]:
    quick = args.quick
    return ["+experiment=owt_flm", f"hydra.run.dir={run_dir}", "data=synthetic",
            f"data.vocab_size={64 if quick else GPT2_VOCAB}",
            *(["model=tiny", "model.length=16", "loader.global_batch_size=4",
               "trainer.precision=32", "trainer.accelerator=cpu"] if quick else []),
            f"loader.batch_size={args.batch}", "trainer.max_steps=1",
            "sampling.print_samples=0", "wandb.mode=disabled",
            f"training.compile={'false' if quick else 'true'}",
            f"training.compile_scope={scope}", f"training.compile_cache={cache}",
            *args.extra]


def run_once(args, cache: Path, scope: str) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="flm-cold-"))
    entry = ["-c", WITH_TIMES] if args.breakdown else ["-m", "main"]
    cmd = [sys.executable, *entry, *overrides(args, run_dir, cache, scope)]
    print("# " + " ".join(cmd), file=sys.stderr, flush=True)
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
    return {"first_step_s": float(found[1]), "training_s": float(found[2]), "wall_s": wall,
            "times": times}


def main() -> None:
    args = parse_args()
    scopes, order = args.scopes.split(","), args.order.split(",")
    if set(order) - {"cold", "warm"}:
        sys.exit(f"--order {args.order}: cold and/or warm")
    caches = {scope: Path(tempfile.mkdtemp(prefix=f"flm-cache-{scope}-")) for scope in scopes}
    rows = []
    for scope in scopes:
        for state in order:
            if state == "cold":
                caches[scope] = Path(tempfile.mkdtemp(prefix=f"flm-cache-{scope}-"))
            rows.append({"scope": scope, "cache": state, **run_once(args, caches[scope], scope)})
            print(f"# done {scope} {state}: {rows[-1].get('first_step_s', 'failed')} s",
                  file=sys.stderr, flush=True)
    import torch  # after the runs: this process's own start-up is not in any row

    device = (torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")
    print(f"\nFirst optimizer step of python -m main +experiment=owt_flm (data=synthetic), "
          f"{device}, torch {torch.__version__}, micro-batch {args.batch}; rows in the order "
          f"run (the first is the machine's first process)\n")
    print("| # | compile_scope | compile cache | first step, s after process start | "
          "of which after training started | process wall s |")
    print("|---|---|---|---|---|---|")
    for k, r in enumerate(rows, 1):
        if "failed" in r:
            print(f"| {k} | {r['scope']} | {r['cache']} | failed ({r['failed']}) | | "
                  f"{r['wall_s']:.1f} |")
            continue
        print(f"| {k} | {r['scope']} | {r['cache']} | {r['first_step_s']:.1f} | "
              f"{r['training_s']:.1f} | {r['wall_s']:.1f} |")
    for k, r in enumerate(rows, 1):
        if r["times"]:
            print(f"\n## row {k} ({r['scope']}, {r['cache']})\n\n{r['times'][:4000]}")


if __name__ == "__main__":
    main()
