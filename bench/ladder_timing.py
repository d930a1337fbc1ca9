"""Where a synthetic ladder's time went: per stage, its wall time (the driver's log), optimizer
steps and training ms/step (train/ms_per_step, last logged value), and the rest (start-up,
validation, sampling). Reads a ``scripts/synthetic_table.py --out`` directory (with
``--budgets`` too).

    python bench/ladder_timing.py runs/ladder
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def training_rate(run: Path) -> tuple[float | None, int | None]:
    """(last logged train/ms_per_step, last logged step) of a run's CSV logs, one pass."""
    ms, steps = None, None
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("train/ms_per_step"):
                    ms = float(row["train/ms_per_step"])
                if row.get("step"):
                    steps = max(steps or 0, int(row["step"]))
    return ms, steps


def main(out: Path) -> None:
    name = "table.json" if (out / "table.json").exists() else "budget_table.json"  # --budgets
    table = json.loads((out / name).read_text()) if (out / name).exists() else {}
    seconds = table.get("settings", {}).get("stage_seconds", {})
    print("| stage | wall s | train ms/step | steps | training s | rest s |")
    print("|---|---|---|---|---|---|")
    for name, wall in seconds.items():
        kind, run = name.split()
        ms, steps = training_rate(out / run) if kind == "train" else (None, None)
        train_s = ms * steps / 1e3 if ms and steps else None
        rest = wall - train_s if train_s is not None else wall
        print(f"| {name} | {wall:.1f} | {ms if ms is None else round(ms, 1)} | {steps} | "
              f"{'' if train_s is None else round(train_s, 1)} | {rest:.1f} |")
    settings = table.get("settings", {})
    total = settings.get("total_seconds")
    print(f"\nstages summed {sum(seconds.values()):.1f} s; wall "
          f"{'(not finished)' if total is None else f'{total:.1f} s'} with up to "
          f"{settings.get('jobs', 1)} stages at a time")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
