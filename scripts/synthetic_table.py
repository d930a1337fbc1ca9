"""Miniature of the paper's step-count table on the exact-likelihood synthetic source.

    python scripts/synthetic_table.py --out runs/ladder            # ~30 min on a 2-core CPU
    python scripts/synthetic_table.py --out /tmp/ladder --quick    # ~2-3 min (CI)
    python scripts/synthetic_table.py --out runs/ladder -- data.source_seed=3

Every stage is a ``python -m main`` subprocess with Hydra overrides (the real CLI), in its
own run directory under ``--out``:

    flm/          FLM trained on the source (algo=flm)
    flm/eval/     FLM sampled at 1, 2, 4, 8, 16, 64, 256 steps, judged by the oracle
    stage1/       stage-1 flow map distilled from it (algo=flm_distill, flm-math §5)
    stage1/eval/  sampled at 1, 2, 4, 8 steps
    fmlm/         FMLM (algo=flm_distill_second, flm-math §6)
    fmlm/eval/    sampled at 1, 2, 4, 8 steps

Then one table, rows model x steps, columns: exact NLL per token under the source, its
exp (oracle gen PPL), the samples' mean unigram entropy, the gap of the NLL to the
source's entropy per token, and network calls per sample. Written to ``--out`` as
``table.md``, ``table.json`` and ``oracle_nll_vs_steps.png``.

Shared settings come from ``+experiment=synthetic_ladder`` (configs/experiment/); the
``--quick`` sizes and the stage-specific keys are added on top; extra overrides after the
options go to every stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.plots import plot_metric_vs_steps  # noqa: E402 - after the repo-root path insert

logger = logging.getLogger("synthetic_table")

EXPERIMENT = "+experiment=synthetic_ladder"
FLM_SAMPLING_STEPS = (1, 2, 4, 8, 16, 64, 256)
DISTILLED_SAMPLING_STEPS = (1, 2, 4, 8)
DEFAULT_FLM_STEPS = 6000  # FLM optimizer steps (default size)
DEFAULT_DISTILL_STEPS = 1500  # optimizer steps of each distillation stage (default size)
QUICK_FLM_STEPS = 60
QUICK_DISTILL_STEPS = 20
QUICK_OVERRIDES = (  # CI size: one-block DiT, short sequences, few samples
    "model.length=16", "model.hidden_size=32", "model.n_heads=2", "model.n_blocks=1",
    "model.cond_dim=16", "loader.global_batch_size=16", "lr_scheduler.num_warmup_steps=5",
    "trainer.val_check_interval=1000", "trainer.limit_val_batches=1", "eval.num_samples=32",
    "sampling.batch_size=32", "data.valid_size=128", "training.ema=0.9",
)
DEVICE_ACCELERATORS = {"cpu": "cpu", "gpu": "gpu", "auto": "auto"}
TABLE_COLUMNS = (  # (key in a table row, markdown header, format)
    ("model", "model", "{}"), ("steps", "steps", "{}"),
    ("oracle_nll_per_token", "oracle NLL/token", "{:.3f}"),
    ("oracle_gen_ppl", "oracle gen PPL", "{:.2f}"),
    ("entropy_mean", "sample entropy", "{:.3f}"),
    ("entropy_gap", "gap to source entropy", "{:+.3f}"),
    ("network_calls_per_sample", "network calls/sample", "{}"),
    ("note", "note", "{}"),
)


@dataclass(frozen=True)
class Model:
    """One model of the ladder: its row label, run directory and sampling sweep."""

    label: str
    run: str
    algo: str
    sampling_steps: tuple[int, ...]


MODELS = (Model("FLM", "flm", "flm", FLM_SAMPLING_STEPS),
          Model("stage-1 map", "stage1", "flm_distill", DISTILLED_SAMPLING_STEPS),
          Model("FMLM", "fmlm", "flm_distill_second", DISTILLED_SAMPLING_STEPS))


def quoted(path: Path) -> str:
    """A path as a Hydra override value (quoted: '=' and ',' are Hydra syntax)."""
    if "'" in str(path):
        raise SystemExit(f"path {path} contains a single quote, which Hydra overrides cannot "
                         "carry: choose another --out")
    return f"'{path}'"


def checkpoint(out: Path, run: str) -> Path:
    return out / run / "checkpoints" / "last.ckpt"


def eval_dir(out: Path, run: str) -> Path:
    return out / run / "eval"


def stage_commands(out: Path, flm_steps: int, distill_steps: int,
                   shared: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(stage name, main.py overrides) in run order; ``shared`` goes to every stage."""
    base = [EXPERIMENT, *shared]
    flm, stage1 = quoted(checkpoint(out, "flm")), quoted(checkpoint(out, "stage1"))
    train = {
        "flm": [f"trainer.max_steps={flm_steps}"],
        "stage1": [f"algo.teacher_path={flm}", f"trainer.max_steps={distill_steps}"],
        "fmlm": [f"algo.teacher_f_path={flm}", f"algo.teacher_g_path={stage1}",
                 f"trainer.max_steps={distill_steps}"],
    }
    commands = []
    for model in MODELS:
        algo = f"algo={model.algo}"  # sample_eval too: the saved algo keys merge into this group
        commands.append((f"train {model.run}", [*base, algo, *train[model.run],
                                                f"hydra.run.dir={quoted(out / model.run)}"]))
        steps = ",".join(str(s) for s in model.sampling_steps)
        commands.append((f"sample_eval {model.run}", [
            *base, algo, "mode=sample_eval", "eval.judge=oracle", "eval.compute_mauve=false",
            f"eval.checkpoint_path={quoted(checkpoint(out, model.run))}",
            f"sampling.steps=[{steps}]", f"eval.output_dir={quoted(eval_dir(out, model.run))}",
            f"hydra.run.dir={quoted(out / model.run / 'eval_run')}"]))
    return commands


def run_stage(name: str, overrides: list[str], log_path: Path, env: dict[str, str]) -> float:
    """``python -m main <overrides>`` from the repo root; output to ``log_path``. Seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("[%s] python -m main %s", name, " ".join(overrides))
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.run([sys.executable, "-m", "main", *overrides], cwd=ROOT, env=env,
                              stdout=log_file, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"stage '{name}' failed (exit {proc.returncode}); last output of "
                         f"{log_path}:\n{tail}")
    logger.info("[%s] done in %.1f s (log %s)", name, seconds, log_path)
    return seconds


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def row_note(row: dict[str, Any]) -> str:
    """Why a row's NLL is infinite (the oracle's impossible-sample count), else ''."""
    if _finite(row.get("oracle_nll_per_token")):
        return ""
    fraction = float(row.get("oracle_impossible_fraction", float("nan")))
    possible = row.get("oracle_nll_per_token_possible")
    note = f"inf: {100 * fraction:.1f}% of samples impossible under the source"
    if _finite(possible):
        note += f"; NLL/token of the rest {float(possible):.3f}"
    return note


def ladder_rows(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Table rows from each model's summary.json (keyed by run name), then a source row."""
    rows = []
    for model in MODELS:
        for row in summaries[model.run]["rows"]:
            rows.append({"model": model.label, "steps": int(row["steps"]),
                         **{key: row.get(key) for key, _, _ in TABLE_COLUMNS[2:-1]},
                         "oracle_impossible_fraction": row.get("oracle_impossible_fraction"),
                         "seconds_per_sample": row.get("seconds_per_sample"),
                         "note": row_note(row)})
    reference = summaries[MODELS[0].run]["reference"]
    rows.append({"model": "source (held-out data)", "steps": None,
                 **{key: reference.get(key) for key, _, _ in TABLE_COLUMNS[2:-1]},
                 "network_calls_per_sample": None,
                 "oracle_impossible_fraction": reference.get("oracle_impossible_fraction"),
                 "seconds_per_sample": None, "note": "samples of the source itself"})
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        if value is None or value == "":
            return "-"
        if isinstance(value, float) and not math.isfinite(value):
            return "inf" if value > 0 else str(value)
        return fmt.format(value)
    lines = ["| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(row, key, fmt) for key, _, fmt in TABLE_COLUMNS) + " |"
              for row in rows]
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """Non-finite floats as null (strict JSON); each such row carries a ``note``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(out: Path, summaries: dict[str, dict[str, Any]], settings: dict[str, Any],
                  ) -> dict[str, Any]:
    """table.md, table.json, oracle_nll_vs_steps.png under ``out``; returns the JSON."""
    rows = ladder_rows(summaries)
    first = summaries[MODELS[0].run]["rows"][0]
    source_entropy = float(first["source_entropy_per_token"])
    header = (f"Synthetic source (exact likelihood): entropy {source_entropy:.4f} nats/token "
              f"over the window (entropy rate {float(first['source_entropy_rate']):.4f}); "
              f"{settings['num_samples']} samples per row, seed {settings['seed']}. "
              "Gap = oracle NLL/token - source entropy/token; sample entropy = mean unigram "
              "entropy of a sample (nats).")
    table = markdown_table(rows)
    (out / "table.md").write_text(f"{header}\n\n{table}\n")
    result = {"source_entropy_per_token": source_entropy,
              "source_entropy_rate": float(first["source_entropy_rate"]),
              "settings": settings, "rows": rows}
    (out / "table.json").write_text(json.dumps(_json_safe(result), indent=2))
    plot_summaries = [{"model_name": m.label, "rows": summaries[m.run]["rows"]} for m in MODELS]
    plot_metric_vs_steps(plot_summaries, "oracle_nll_per_token", "oracle NLL per token (nats)",
                         str(out / "oracle_nll_vs_steps.png"),
                         {"source entropy per token": source_entropy})
    logger.info("%s\n\n%s\n\nwrote %s, %s, %s", header, table, out / "table.md",
                out / "table.json", out / "oracle_nll_vs_steps.png")
    return result


def stage_env(device: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               PYTHONUNBUFFERED="1")
    if device == "cpu":  # sample_eval picks CUDA whenever it is visible
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="directory of the stage runs, "
                   "table.md, table.json and the plot (must be new or empty)")
    p.add_argument("--quick", action="store_true", help="CI sizes (~2-3 minutes on a CPU)")
    p.add_argument("--device", choices=sorted(DEVICE_ACCELERATORS), default="cpu",
                   help="trainer.accelerator of every stage; cpu also hides CUDA from sampling")
    p.add_argument("--flm-steps", type=int, default=None, help="FLM optimizer steps "
                   f"(default {DEFAULT_FLM_STEPS}, --quick {QUICK_FLM_STEPS})")
    p.add_argument("--distill-steps", type=int, default=None, help="optimizer steps of each "
                   f"distillation stage (default {DEFAULT_DISTILL_STEPS}, --quick "
                   f"{QUICK_DISTILL_STEPS})")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every stage, e.g. "
                   "data.source_seed=3 seed=2 (after the options, or after --)")
    args = p.parse_args(argv)
    for name in ("flm_steps", "distill_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}={value}: use a positive number of steps")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty: the stages resume from and overwrite "
                         "what is there; pass a new directory")
    out.mkdir(parents=True, exist_ok=True)
    flm_steps = args.flm_steps or (QUICK_FLM_STEPS if args.quick else DEFAULT_FLM_STEPS)
    distill_steps = args.distill_steps or (QUICK_DISTILL_STEPS if args.quick
                                           else DEFAULT_DISTILL_STEPS)
    shared = [f"trainer.accelerator={DEVICE_ACCELERATORS[args.device]}",
              *(["trainer.devices=1"] if args.device == "gpu" else []),
              *(QUICK_OVERRIDES if args.quick else ()), *args.overrides]
    env = stage_env(args.device)
    seconds = {}
    for name, overrides in stage_commands(out, flm_steps, distill_steps, shared):
        run = name.split()[-1]
        log_path = out / run / f"{name.split()[0]}.log"
        seconds[name] = run_stage(name, overrides, log_path, env)
    summaries = {m.run: json.loads((eval_dir(out, m.run) / "summary.json").read_text())
                 for m in MODELS}
    settings = {"quick": args.quick, "device": args.device, "flm_steps": flm_steps,
                "distill_steps": distill_steps, "shared_overrides": [EXPERIMENT, *shared],
                "num_samples": summaries["flm"]["num_samples"], "seed": summaries["flm"]["seed"],
                "stage_seconds": seconds, "total_seconds": sum(seconds.values())}
    return write_outputs(out, summaries, settings)


if __name__ == "__main__":
    main()
