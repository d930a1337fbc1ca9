"""Where the GPU waits inside `python -m main`: torch.profiler over chosen optimizer steps of a
real run; prints three tables per window.

    python bench/trace_loop.py                          # GPU: end_to_end.py's OWT settings
    python bench/trace_loop.py --window 300:310 --window 495:505 \
        callbacks.checkpoint_last.every_n_train_steps=500   # a checkpoint write in the 2nd
    python bench/trace_loop.py --quick                  # CPU smoke run, tiny sizes

The run is end_to_end.py's (`+experiment=owt_flm` on synthetic data at V = 50,258,
compiled), executed in this process so that a callback can switch the profiler on for the
optimizer steps of each --window [first, last). Lightning's own profiler hooks are pointed at
`torch.profiler.record_function`, so every hook (callbacks, the module's steps, the
strategy's backward, checkpoint saves) is a named range in the trace.

Table 1, per step: wall time (host, from one step start to the next), GPU busy time (the
union of kernel and copy intervals) and the idle rest. Table 2: GPU idle gaps longer than
--min-gap-us, summed by what the host was doing when it launched the work that ended the
gap (innermost Lightning range, innermost aten op). Table 3: host calls that wait for the
device (stream / event / device synchronisation, blocking copies) by the range they ran in.
"""

from __future__ import annotations

import argparse
import bisect
import json
import runpy
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

import end_to_end  # noqa: E402
from common import ROOT  # noqa: E402

WAITS = ("Synchronize", "cudaMemcpy ", "cudaMemcpy\0")  # host calls that block on the device
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


class RangeProfiler:
    """A Lightning profiler whose actions are record_function ranges (names as Lightning
    gives them, e.g. ``[Callback]StepCheckpoint.on_train_batch_end``)."""

    def __init__(self) -> None:
        from pytorch_lightning.profilers import Profiler

        class _Ranges(Profiler):
            def __init__(self) -> None:
                super().__init__()
                self._open: dict[str, list] = defaultdict(list)

            def start(self, action_name: str) -> None:
                r = record_function(action_name)
                r.__enter__()
                self._open[action_name].append(r)

            def stop(self, action_name: str) -> None:
                if self._open[action_name]:
                    self._open[action_name].pop().__exit__(None, None, None)

            def summary(self) -> str:
                return ""

        self.profiler = _Ranges()


def window_callback(windows: list[tuple[int, int]], out_dir: Path):
    """A callback that profiles optimizer steps [first, last) of each window and marks each
    step as a ``step N`` range."""
    import pytorch_lightning as pl

    class _Trace(pl.Callback):
        def __init__(self) -> None:
            self.prof = None
            self.current = None
            self.step_range = None
            self.traces: list[tuple[tuple[int, int], Path]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            step = trainer.global_step
            if self.step_range is not None:
                self.step_range.__exit__(None, None, None)
                self.step_range = None
            if self.prof is not None and step >= self.current[1]:
                self._finish()
            if self.prof is None:
                for w in windows:
                    if step == w[0]:
                        self.current = w
                        activities = [ProfilerActivity.CPU]
                        if torch.cuda.is_available():
                            activities.append(ProfilerActivity.CUDA)
                        self.prof = profile(activities=activities, record_shapes=False)
                        self.prof.__enter__()
            if self.prof is not None:
                self.step_range = record_function(f"step {step}")
                self.step_range.__enter__()

        def _finish(self) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            path = out_dir / f"trace_{self.current[0]}_{self.current[1]}.json"
            self.prof.export_chrome_trace(str(path))
            self.traces.append((self.current, path))
            self.prof = None

        def on_train_end(self, trainer, pl_module) -> None:
            if self.step_range is not None:
                self.step_range.__exit__(None, None, None)
            if self.prof is not None:
                self._finish()

    return _Trace()


def run_main(overrides: list[str], windows, out_dir: Path):
    """``python -m main <overrides>`` in this process with the trace callback and the range
    profiler added to the Trainer."""
    import pytorch_lightning as pl

    trace = window_callback(windows, out_dir)
    ranges = RangeProfiler().profiler
    original = pl.Trainer.__init__

    def init(self, *a, **k):
        k["callbacks"] = list(k.get("callbacks") or []) + [trace]
        if k.get("profiler") is None:
            k["profiler"] = ranges
        original(self, *a, **k)

    pl.Trainer.__init__ = init
    argv = sys.argv
    sys.argv = ["main"] + overrides
    try:
        runpy.run_module("main", run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    finally:
        sys.argv, pl.Trainer.__init__ = argv, original
    return trace.traces


def load(path: Path) -> list[dict]:
    with open(path) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def busy_within(busy: list[tuple[float, float]], lo: float, hi: float) -> float:
    return sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in busy)


class Enclosing:
    """Innermost host range (of one kind) around a time on a thread: ranges sorted by start,
    properly nested per thread."""

    def __init__(self, events: list[dict]) -> None:
        self.by_tid: dict = defaultdict(list)
        for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
            self.by_tid[e["tid"]].append(e)
        self.starts = {tid: [e["ts"] for e in evs] for tid, evs in self.by_tid.items()}

    def at(self, tid, ts: float) -> str:
        evs, starts = self.by_tid.get(tid, []), self.starts.get(tid, [])
        i = bisect.bisect_right(starts, ts) - 1
        best = None
        # walk back to the innermost range still open at ts (nesting: later start = inner)
        for j in range(i, max(-1, i - 2000), -1):
            e = evs[j]
            if e["ts"] <= ts <= e["ts"] + e["dur"]:
                best = e
                break
        return best["name"] if best else "-"


def analyse(path: Path, min_gap_us: float, top: int) -> str:
    events = load(path)
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    ranges = [e for e in events if e.get("cat") == "user_annotation"
              and not e["name"].startswith("step ")]
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    steps = sorted((e for e in events if e.get("cat") == "user_annotation"
                    and e["name"].startswith("step ")), key=lambda e: e["ts"])
    busy = merged([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    lines = [f"\n### {path.name}: {len(steps)} steps, {len(gpu)} GPU events\n",
             "| step | wall ms | GPU busy ms | GPU idle ms |", "|---|---|---|---|"]
    walls, idles = [], []
    for i, s in enumerate(steps):
        lo = s["ts"]
        hi = steps[i + 1]["ts"] if i + 1 < len(steps) else s["ts"] + s["dur"]
        b = busy_within(busy, lo, hi)
        walls.append(hi - lo)
        idles.append(hi - lo - b)
        lines.append(f"| {s['name'][5:]} | {(hi - lo) / 1e3:.1f} | {b / 1e3:.1f} | "
                     f"{(hi - lo - b) / 1e3:.1f} |")
    if walls:
        lines.append(f"| mean | {sum(walls) / len(walls) / 1e3:.1f} | "
                     f"{(sum(walls) - sum(idles)) / len(walls) / 1e3:.1f} | "
                     f"{sum(idles) / len(walls) / 1e3:.1f} |")
    # gaps: the launch of the GPU work that ended each gap, and what the host was doing then
    launch = {e["args"].get("correlation"): e for e in runtime if "args" in e}
    in_range, in_op = Enclosing(ranges), Enclosing(ops)
    gpu.sort(key=lambda e: e["ts"])
    gpu_starts = [e["ts"] for e in gpu]
    gap_sum: dict = defaultdict(lambda: [0, 0.0])
    lo_all = steps[0]["ts"] if steps else float("-inf")
    for (_, b), (c, _) in zip(busy, busy[1:]):
        gap = c - b
        if gap < min_gap_us or b < lo_all:
            continue
        nxt = gpu[min(bisect.bisect_left(gpu_starts, c - 1e-3), len(gpu) - 1)]
        ln = launch.get(nxt.get("args", {}).get("correlation"))
        if ln is None:
            key = ("(no launch record)", "-")
        else:
            key = (in_range.at(ln["tid"], ln["ts"]), in_op.at(ln["tid"], ln["ts"]))
        gap_sum[key][0] += 1
        gap_sum[key][1] += gap
    n = max(1, len(steps))
    lines += [f"\nGPU idle gaps >= {min_gap_us:.0f} us, by the host range / aten op that "
              "launched the next GPU work (ms per step)\n",
              "| range | aten op | gaps | ms/step |", "|---|---|---|---|"]
    for (rng, op), (count, total) in sorted(gap_sum.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| {rng} | {op} | {count} | {total / n / 1e3:.2f} |")
    waits: dict = defaultdict(lambda: [0, 0.0])
    for e in runtime:
        if any(w.rstrip("\0") in e["name"] + " " for w in WAITS) and e["dur"] > 20:
            key = (e["name"], in_range.at(e["tid"], e["ts"]), in_op.at(e["tid"], e["ts"]))
            waits[key][0] += 1
            waits[key][1] += e["dur"]
    lines += ["\nHost calls that wait for the device (> 20 us), by range (ms per step)\n",
              "| call | range | aten op | calls | ms/step |", "|---|---|---|---|---|"]
    for (name, rng, op), (count, total) in sorted(waits.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| {name} | {rng} | {op} | {count} | {total / n / 1e3:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    end_to_end.add_run_options(p, steps=520, quick_steps=40)
    p.add_argument("--window", action="append", default=None,
                   help="first:last optimizer steps to trace (repeatable); default 300:310 and "
                        "495:505 (a checkpoint write at 500 with the override "
                        "callbacks.checkpoint_last.every_n_train_steps=500); quick: 20:25")
    p.add_argument("--min-gap-us", type=float, default=50.0)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    end_to_end.fill_run_options(args, steps=520, quick_steps=40)
    windows = [tuple(int(x) for x in w.split(":")) for w in
               (args.window or (["20:25"] if args.quick else ["300:310", "495:505"]))]
    for first, last in windows:
        if not 0 <= first < last <= args.steps:
            sys.exit(f"--window {first}:{last}: need 0 <= first < last <= --steps {args.steps}")
    run_dir = Path(tempfile.mkdtemp(prefix="flm-trace-"))
    overrides = end_to_end.owt_overrides(args, run_dir)
    print("# python -m main " + " ".join(overrides), flush=True)
    sys.path.insert(0, str(ROOT))
    traces = run_main(overrides, windows, run_dir)
    for _, path in traces:
        print(analyse(path, args.min_gap_us, args.top), flush=True)


if __name__ == "__main__":
    main()
