"""Miniature of the paper's step-count table on the exact-likelihood synthetic source.

    python scripts/synthetic_table.py --out runs/ladder               # ~40 min, 2-core CPU
    python scripts/synthetic_table.py --out /tmp/ladder --size quick  # ~3-5 min (CI)
    python scripts/synthetic_table.py --out runs/ladder --size gpu    # < 10 min, one GPU
    python scripts/synthetic_table.py --out runs/ladder -- data.source_seed=3
    python scripts/synthetic_table.py --out runs/budgets --size gpu --budgets 4000,8000  # ~20 min

Every stage is a ``python -m main`` subprocess with Hydra overrides (the real CLI), in its
own run directory under ``--out``; ``--jobs N`` runs up to N at a time, each once the
checkpoints it reads exist (the gpu preset: 4):

    flm/            FLM trained on the source (algo=flm), validation logs val/gap
    flm/eval/       FLM sampled at every step count of the preset, judged by the oracle
    oracle/eval/    the same Euler sampler driven by the exact denoiser (eval.denoiser=oracle)
    stage1/         stage-1 flow map distilled from FLM (algo=flm_distill, docs/math.md §5)
    fmlm/           FMLM (algo=flm_distill_second, docs/math.md §6)
    stage1_oracle/  stage 1 with the exact denoiser as teacher (algo.teacher_path=oracle)
    fmlm_oracle/    FMLM from it (algo.teacher_f_path=oracle): distillation in isolation
    <algo>/         baselines of the preset (e.g. mdlm, ar) when algo.ALGORITHMS has them

Then one table, rows model x steps, columns: exact NLL per token under the source, its
exp (oracle gen PPL), the fraction of near-impossible transitions (p < 1e-3 under the
source), the samples' mean unigram entropy, the gap of the NLL to the source's entropy per
token, network calls per sample, and for FLM the training gap (its validation
cross-entropy minus the exact denoiser's on the same noisy inputs, val/gap at the last
validation). Written to ``--out`` as ``table.md``, ``table.json``,
``oracle_nll_vs_steps.png`` and ``gap_vs_t.png`` (FLM's val/gap per tenth of t); after
each evaluation the table of the models evaluated so far is written, marked partial, so a
run cut short keeps what it finished.

``--diagnose`` adds eval.diagnose=true to FLM's evaluation (KL(exact || FLM) per tenth of
t on its own trajectories and on data states: ``table.json``, ``kl_vs_t.png``);
``--bands 0-0.2,0.2-1`` samples FLM's checkpoint with the network on each band of t and
the exact denoiser elsewhere (eval.denoiser=hybrid), rows plus a band table of the excess
NLL over the exact denoiser (docs/math.md §12).

``--budgets B1,B2,...``: FLM, MDLM and AR are each trained once, to the largest budget,
under ``--out/<run>``, keeping a checkpoint every gcd(budgets) optimizer steps
(callbacks.checkpoint_every_n_steps, ``checkpoints/step<N>.ckpt``). The learning rate is
constant after warm-up and nothing else in training depends on trainer.max_steps, so the
checkpoint at step B is the run of budget B (tests/test_budget_checkpoints.py checks it).
Per budget B, under ``--out/budget_<B>``: each of those models sampled from its step-B
checkpoint, stage 1 and FMLM distilled from FLM's, and FLM's diagnostics and bands, each
stage started as soon as the checkpoint it reads exists (they are written atomically),
while the training goes on. The exact denoiser and the exact-teacher distillations, which
no budget changes, run once (``--out/<run>``) and appear in every budget's table. Training
costs the largest budget, not the sum. Then each budget's ladder table
(``budget_<B>/table.md``, ``table.json`` and plots), and in ``--out``
``budget_table.md``, ``budget_table.json`` (every stage's wall time under
``settings.stage_seconds``) and ``oracle_nll_vs_budget.png`` (oracle NLL against optimizer
steps, one line per sampling-step count, one panel per model).

Shared settings come from ``+experiment=synthetic_ladder`` (configs/experiment/); the
``--size`` preset's overrides and the stage-specific keys are added on top; extra
overrides after the options go to every stage.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.plots import (  # noqa: E402 - after the repo-root path insert
    plot_diagnostics,
    plot_metric_vs_steps,
)
from models.exact_denoiser import GAP_TIME_BINS, ORACLE  # noqa: E402
from runtime import cli  # noqa: E402 - after the repo-root path insert
from runtime.checkpointing import LAST_NAME, PERIODIC_PREFIX  # noqa: E402

logger = logging.getLogger("synthetic_table")

EXPERIMENT = "+experiment=synthetic_ladder"
FLM_SAMPLING_STEPS = (1, 2, 4, 8, 16, 64, 256)
DISTILLED_SAMPLING_STEPS = (1, 2, 4, 8)
DEVICE_ACCELERATORS = {"cpu": "cpu", "gpu": "gpu", "auto": "auto"}
TABLE_COLUMNS = (  # (key in a table row, markdown header, format)
    ("model", "model", "{}"), ("steps", "steps", "{}"),
    ("oracle_nll_per_token", "oracle NLL/token", "{:.3f}"),
    ("oracle_gen_ppl", "oracle gen PPL", "{:.2f}"),
    ("oracle_near_impossible_fraction", "near-impossible transitions", "{:.4f}"),
    ("entropy_mean", "sample entropy", "{:.3f}"),
    ("entropy_gap", "gap to source entropy", "{:+.3f}"),
    ("network_calls_per_sample", "network calls/sample", "{}"),
    ("training_gap", "training gap (val/gap)", "{:.4f}"),
    ("note", "note", "{}"),
)
ROW_KEYS = tuple(key for key, _, _ in TABLE_COLUMNS[2:-2])  # copied from summary.json rows


@dataclass(frozen=True)
class Model:
    """One model of the ladder: its row label, run directory, algorithm, sampling sweep,
    training overrides (None: nothing to train, the exact denoiser) and calls per step."""

    label: str
    run: str
    algo: str
    sampling_steps: tuple[int, ...]
    train: tuple[str, ...] | None = ()
    calls_per_step: int = 1
    sampled_from: str | None = None  # untrained: the run whose checkpoint it samples
    eval_overrides: tuple[str, ...] = ()  # added to its sample_eval stage


@dataclass(frozen=True)
class Preset:
    """A ``--size``: shared overrides, optimizer steps and sampling sweeps."""

    overrides: tuple[str, ...]
    flm_steps: int  # FLM (and baseline) optimizer steps
    distill_steps: int  # optimizer steps of each distillation stage
    flm_sampling_steps: tuple[int, ...]
    distilled_sampling_steps: tuple[int, ...]
    oracle_sampling_steps: tuple[int, ...] | None = None  # exact-denoiser rows (None: FLM's)
    baselines: tuple[str, ...] = ()  # algos run when algo.ALGORITHMS has them
    baseline_steps: int | None = None  # optimizer steps of a baseline (None: flm_steps)
    jobs: int = 1  # stages run at a time (--jobs)


PRESETS = {
    # CI size: one-block DiT, short sequences, few samples; a validation at step 30 and 60
    "quick": Preset(
        overrides=("model.length=16", "model.hidden_size=32", "model.n_heads=2",
                   "model.n_blocks=1", "model.cond_dim=16", "loader.global_batch_size=16",
                   "lr_scheduler.num_warmup_steps=5", "trainer.val_check_interval=30",
                   "trainer.limit_val_batches=1", "eval.num_samples=32",
                   "sampling.batch_size=32", "data.valid_size=128", "training.ema=0.9"),
        flm_steps=60, distill_steps=20, flm_sampling_steps=FLM_SAMPLING_STEPS,
        distilled_sampling_steps=DISTILLED_SAMPLING_STEPS,
        oracle_sampling_steps=(1, 2, 4, 8, 16, 64)),  # its forward-backward is slow on a CPU
    # 2-core CPU, ~40 min with the baselines: the experiment config as it is
    "cpu": Preset(overrides=(), flm_steps=6000, distill_steps=1500,
                  flm_sampling_steps=FLM_SAMPLING_STEPS,
                  distilled_sampling_steps=DISTILLED_SAMPLING_STEPS,
                  baselines=("mdlm", "ar")),  # at FLM's budget
    # one H100 or H200, < 10 min. Eager steps of this DiT are launch-bound at any width (timed
    # on an H200, bench/results/ladder_*_h200.txt: ~40-56 ms FLM / MDLM / AR, ~80-160 ms
    # stage 1, ~65-125 ms FMLM, each stage ~16-20 s of start-up and sampling), so the GPU is
    # mostly idle under one process: 4 stages run at a time (--jobs), each as soon as the
    # checkpoints it reads exist, the FLM -> stage 1 -> FMLM chain first. FLM, MDLM and AR get
    # the same budget; the wide batches of a wider DiT cost no extra time per step
    "gpu": Preset(
        overrides=("model.hidden_size=384", "model.n_blocks=6", "model.n_heads=6",
                   "model.attn_softcap=null", "model.cond_dim=128",
                   "loader.global_batch_size=1024", "loader.num_workers=2",
                   "lr_scheduler.num_warmup_steps=200", "training.ema=0.999",
                   "trainer.precision=bf16", "trainer.val_check_interval=1000",
                   "trainer.limit_val_batches=4", "trainer.log_every_n_steps=100",
                   "eval.num_samples=512", "sampling.batch_size=512"),
        flm_steps=4000, distill_steps=250,
        flm_sampling_steps=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
        distilled_sampling_steps=(1, 2, 4, 8, 16),
        baselines=("mdlm", "ar"), baseline_steps=4000, jobs=4),
}
BASELINE_OVERRIDES = {"ar": ("algo.first_token=start",)}  # synthetic data has no BOS


BUDGET_FREE_RUNS = (ORACLE, "stage1_oracle", "fmlm_oracle")  # no FLM / baseline budget in them


def band_label(band: tuple[float, float]) -> str:
    return f"FLM on [{band[0]:g}, {band[1]:g}), exact elsewhere"


def models(preset: Preset, length: int, available: Sequence[str], diagnose: bool = False,
           bands: Sequence[tuple[float, float]] = ()) -> tuple[Model, ...]:
    """The ladder's rows for a preset; ``available``: algo.ALGORITHMS' names;
    ``diagnose``: FLM's evaluation adds eval.diagnose=true;
    ``bands``: one row per band, FLM's checkpoint sampled with eval.denoiser=hybrid
    (evaluation/diagnostics.py)."""
    flm_steps, distilled = preset.flm_sampling_steps, preset.distilled_sampling_steps
    rows = [Model("FLM", "flm", "flm", flm_steps,
                  eval_overrides=("eval.diagnose=true",) if diagnose else ()),
            Model("exact denoiser", ORACLE, "flm", preset.oracle_sampling_steps or flm_steps,
                  train=None),
            Model("stage-1 map", "stage1", "flm_distill", distilled, calls_per_step=2),
            Model("FMLM", "fmlm", "flm_distill_second", distilled),
            Model("stage-1 map (exact teacher)", "stage1_oracle", "flm_distill", distilled,
                  calls_per_step=2),
            Model("FMLM (exact teacher)", "fmlm_oracle", "flm_distill_second", distilled)]
    for name in preset.baselines:
        if name not in available:
            logger.info("algo=%s is not in algo.ALGORITHMS: no %s row", name, name)
            continue
        steps = (length,) if name == "ar" else flm_steps  # AR: one call per token
        rows.append(Model(name.upper(), name, name, steps, train=BASELINE_OVERRIDES.get(
            name, ())))
    for lo, hi in bands:
        rows.append(Model(band_label((lo, hi)), f"band_{lo:g}_{hi:g}", "flm", flm_steps,
                          train=None, sampled_from="flm", eval_overrides=(
                              "eval.denoiser=hybrid", f"eval.hybrid_band=[{lo},{hi}]")))
    return tuple(rows)


BUDGET_FREE_LABELS = frozenset(m.label for m in models(PRESETS["quick"], 1, ())
                               if m.run in BUDGET_FREE_RUNS)  # their rows in a table


def quoted(path: Path) -> str:
    """A path as a Hydra override value (quoted: '=' and ',' are Hydra syntax)."""
    if "'" in str(path):
        raise SystemExit(f"path {path} contains a single quote, which Hydra overrides cannot "
                         "carry: choose another --out")
    return f"'{path}'"


def checkpoint(out: Path, run: str) -> Path:
    return out / run / "checkpoints" / LAST_NAME


def step_checkpoint(out: Path, run: str, step: int) -> Path:
    """The periodic checkpoint of ``out/run`` at optimizer step ``step`` (main.py names them
    ``step<8 digits>.ckpt``; written atomically, so it is complete once it exists)."""
    return out / run / "checkpoints" / f"{PERIODIC_PREFIX}{step:08d}.ckpt"


def eval_dir(out: Path, run: str) -> Path:
    return out / run / "eval"


@dataclass(frozen=True)
class Stage:
    """One ``python -m main`` run of the ladder: its name ("train flm", "sample_eval flm",
    "train budget_2000/stage1": the kind, then its run directory relative to ``--out``), its
    overrides, the stages that must have finished before it starts (``needs``), and the
    checkpoint files it reads from a stage that may still be running (``reads``: (writer
    stage, file) pairs; it starts once each file exists)."""

    name: str
    overrides: list[str]
    needs: tuple[str, ...] = ()
    reads: tuple[tuple[str, Path], ...] = ()

    @property
    def run(self) -> str:
        return self.name.split()[-1]


# the checkpoints each distillation stage reads (its teachers)
TEACHER_RUNS = {"stage1": ("flm",), "fmlm": ("flm", "stage1"), "fmlm_oracle": ("stage1_oracle",)}


def stage_commands(out: Path, preset: Preset, flm_steps: int, distill_steps: int,
                   shared: Sequence[str], ladder: Sequence[Model],
                   baseline_steps: int | None = None, root: Path | None = None,
                   trained: dict[str, tuple[str, Path]] | None = None,
                   budget_overrides: Sequence[str] = (), evaluate: bool = True) -> list[Stage]:
    """The ladder's stages in run order (a valid sequential order: every stage after what it
    needs); ``shared`` goes to every stage. Run directories are ``out/<run>``, stage names
    relative to ``root`` (default ``out``). ``trained``: runs trained outside this ladder, run
    -> (the stage writing its checkpoint, the file): no train stage, their readers wait for
    the file. ``budget_overrides`` go to the FLM and baseline training stages;
    ``evaluate=False`` leaves out the sample_eval stages."""
    root = root or out
    trained = trained or {}
    prefix = out.relative_to(root)
    base = [EXPERIMENT, *shared]

    def name(kind: str, run: str) -> str:
        return f"{kind} {(prefix / run).as_posix()}"

    def ckpt(run: str) -> str:
        return quoted(trained[run][1] if run in trained else checkpoint(out, run))

    def after(runs: Sequence[str]) -> tuple[tuple[str, ...], tuple[tuple[str, Path], ...]]:
        """(needs, reads) of a stage reading the checkpoints of ``runs``."""
        return (tuple(name("train", run) for run in runs if run not in trained),
                tuple(trained[run] for run in runs if run in trained))

    baseline_steps = baseline_steps or preset.baseline_steps or flm_steps
    distill = [f"trainer.max_steps={distill_steps}"]
    train = {
        "flm": [f"trainer.max_steps={flm_steps}", *budget_overrides],
        "stage1": [f"algo.teacher_path={ckpt('flm')}", *distill],
        "fmlm": [f"algo.teacher_f_path={ckpt('flm')}", f"algo.teacher_g_path={ckpt('stage1')}",
                 *distill],
        "stage1_oracle": [f"algo.teacher_path={ORACLE}", *distill],
        "fmlm_oracle": [f"algo.teacher_f_path={ORACLE}",
                        f"algo.teacher_g_path={ckpt('stage1_oracle')}", *distill],
    }
    commands = []
    for model in ladder:
        algo = f"algo={model.algo}"  # sample_eval too: the saved algo keys merge into this group
        extra = [*model.train] if model.train else []
        if model.train is not None and model.run not in trained:
            stage = train.get(model.run, [f"trainer.max_steps={baseline_steps}",
                                          *budget_overrides])
            commands.append(Stage(name("train", model.run), [
                *base, algo, *extra, *stage, f"hydra.run.dir={quoted(out / model.run)}"],
                *after(TEACHER_RUNS.get(model.run, ()))))
        if not evaluate:
            continue
        if model.train is not None:
            source = [f"eval.checkpoint_path={ckpt(model.run)}"]
            evaluated_after = after((model.run,))
        elif model.sampled_from is not None:
            source = [f"eval.checkpoint_path={ckpt(model.sampled_from)}"]
            evaluated_after = after((model.sampled_from,))
        else:
            source = [f"eval.denoiser={ORACLE}"]
            evaluated_after = ((), ())
        steps = ",".join(str(s) for s in model.sampling_steps)
        commands.append(Stage(name("sample_eval", model.run), [
            *base, algo, *extra, "mode=sample_eval", "eval.judge=oracle",
            "eval.compute_mauve=false", *source, *model.eval_overrides,
            f"sampling.steps=[{steps}]",
            f"eval.output_dir={quoted(eval_dir(out, model.run))}",
            f"hydra.run.dir={quoted(out / model.run / 'eval_run')}"], *evaluated_after))
    return commands


def budget_dir(out: Path, budget: int) -> Path:
    return out / f"budget_{budget}"


def budget_run(budget: int, run: str) -> str:
    """Where (relative to ``--out``) a model of budget ``budget``'s ladder is evaluated: a
    model no budget changes once, in ``<run>``; the others in ``budget_<B>/<run>``."""
    return run if run in BUDGET_FREE_RUNS else (budget_dir(Path(), budget) / run).as_posix()


def trained_once(ladder: Sequence[Model]) -> tuple[Model, ...]:
    """The models an optimizer budget applies to (FLM and the baselines): trained once, to
    the largest budget, and evaluated from the checkpoint at each budget's step."""
    return tuple(m for m in ladder if m.train is not None and m.run not in TEACHER_RUNS
                 and m.run not in BUDGET_FREE_RUNS)


def periodic_overrides(budgets: Sequence[int], last_every: int) -> list[str]:
    """Training overrides that keep a checkpoint (``step<N>.ckpt``, save_top_k=-1) every
    gcd(budgets) steps, so one exists at each budget's step. ``last_every``: the stage's
    callbacks.checkpoint_last.every_n_train_steps; the two callbacks may not share a period
    (runtime/config.py), so when they would, last.ckpt is written only at the end
    (FinalCheckpoint): the ladder never resumes a stage."""
    every = math.gcd(*budgets)
    keys = [f"callbacks.checkpoint_every_n_steps.every_n_train_steps={every}",
            "callbacks.checkpoint_every_n_steps.save_top_k=-1"]
    if every == last_every:
        keys.append(f"callbacks.checkpoint_last.every_n_train_steps={max(budgets) + 1}")
    return keys


def budget_stage_commands(out: Path, preset: Preset, budgets: Sequence[int],
                          distill_steps: int, shared: Sequence[str], ladder: Sequence[Model],
                          last_every: int) -> list[Stage]:
    """The stages of ``--budgets``: FLM and the baselines trained once, to the largest budget,
    under ``out/<run>``, keeping ``step<B>.ckpt`` at every budget B (``periodic_overrides``);
    the models no budget changes once, under ``out/<run>``; per budget B, under
    ``out/budget_<B>/<run>``, the sample_eval of each of those checkpoints at step B and the
    distillations (and their evaluations) from FLM's, each started once the file it reads
    exists. Training costs the largest budget, not the sum."""
    longest = max(budgets)
    once = trained_once(ladder)
    free = [m for m in ladder if m.run in BUDGET_FREE_RUNS]
    stages = stage_commands(out, preset, longest, distill_steps, shared, once, longest,
                            budget_overrides=periodic_overrides(budgets, last_every),
                            evaluate=False)
    stages += stage_commands(out, preset, longest, distill_steps, shared, free)
    per_budget = [m for m in ladder if m.run not in BUDGET_FREE_RUNS]
    for budget in budgets:
        trained = {m.run: (f"train {m.run}", step_checkpoint(out, m.run, budget))
                   for m in once}
        stages += stage_commands(budget_dir(out, budget), preset, budget, distill_steps,
                                 shared, per_budget, budget, root=out, trained=trained)
    return stages


def _log_tail(log_path: Path, chars: int = 3000) -> str:
    return log_path.read_text(errors="replace")[-chars:] if log_path.is_file() else ""


def critical_order(stages: Sequence[Stage]) -> dict[str, int]:
    """Stages that have the longest chain of stages waiting on them (``needs`` and the
    writers of ``reads``) come first (the FLM -> stage 1 -> FMLM chain), so the runs in
    parallel end as early as the chain allows; ties keep the run order. Returns name -> rank
    (0 first)."""
    dependents: dict[str, list[str]] = {st.name: [] for st in stages}
    for st in stages:
        for need in (*st.needs, *(writer for writer, _ in st.reads)):
            if need not in dependents:
                raise ValueError(f"stage '{st.name}' needs '{need}', which is not a stage")
            dependents[need].append(st.name)
    depth: dict[str, int] = {}

    def chain(name: str) -> int:
        if name not in depth:
            depth[name] = 1 + max((chain(d) for d in dependents[name]), default=0)
        return depth[name]

    order = sorted(range(len(stages)), key=lambda i: (-chain(stages[i].name), i))
    return {stages[i].name: rank for rank, i in enumerate(order)}


def stage_log(out: Path, stage: Stage) -> Path:
    return out / stage.run / f"{stage.name.split()[0]}.log"


def main_command(stage: Stage) -> list[str]:
    return [sys.executable, "-m", "main", *stage.overrides]


def run_stages(stages: Sequence[Stage], out: Path, env: dict[str, str], jobs: int,
               on_done=None, poll_seconds: float = 0.5, command=main_command,
               ) -> dict[str, float]:
    """Run every stage (``command(stage)``: ``python -m main <overrides>``, from the repo
    root, output to its log), up to ``jobs`` at a time, each once all it ``needs`` has
    finished and every file it ``reads`` exists (checkpoints are written to a temporary file
    and renamed, runtime/checkpointing.write_atomically: one that exists is complete);
    ``on_done(stage, seconds so far)`` after each success. Seconds per stage. A failed
    stage, or one that ends without writing a file another reads, stops the others and is
    one SystemExit (with the end of its log); so is any exception here (SIGTERM through
    ``main``'s handler, Ctrl-C): no stage outlives the driver."""
    rank = critical_order(stages)
    pending = sorted(stages, key=lambda st: rank[st.name])
    running: dict[str, tuple[Stage, subprocess.Popen, float, Any]] = {}
    seconds: dict[str, float] = {}

    def stop_all() -> None:
        for _, proc, _, _ in running.values():
            proc.terminate()
        for _, proc, _, log_file in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log_file.close()

    def ready(st: Stage) -> bool:
        for writer, path in st.reads:
            if not path.is_file():
                if writer in seconds:
                    raise SystemExit(f"stage '{writer}' ended without writing {path}, which "
                                     f"stage '{st.name}' reads")
                return False
        return all(need in seconds for need in st.needs)

    try:
        while pending or running:
            for st in list(pending):
                if len(running) >= jobs:
                    break
                if ready(st):
                    log_path = stage_log(out, st)
                    log_path.parent.mkdir(parents=True, exist_ok=True)
                    logger.info("[%s] python -m main %s", st.name, " ".join(st.overrides))
                    log_file = open(log_path, "w")  # noqa: SIM115 - closed when it ends
                    proc = subprocess.Popen(command(st), cwd=ROOT, env=env, stdout=log_file,
                                            stderr=subprocess.STDOUT, text=True)
                    running[st.name] = (st, proc, time.perf_counter(), log_file)
                    pending.remove(st)
            if not running:
                raise SystemExit("the ladder's stages wait on each other: " + ", ".join(
                    f"{st.name} needs {st.needs} and reads {[str(p) for _, p in st.reads]}"
                    for st in pending))
            time.sleep(poll_seconds)
            for name in [n for n, (_, proc, _, _) in running.items() if proc.poll() is not None]:
                st, proc, start, log_file = running.pop(name)
                log_file.close()
                if proc.returncode != 0:
                    raise SystemExit(f"stage '{name}' failed (exit {proc.returncode}); last "
                                     f"output of {stage_log(out, st)}:\n"
                                     f"{_log_tail(stage_log(out, st))}")
                seconds[name] = time.perf_counter() - start
                logger.info("[%s] done in %.1f s (log %s; %d running, %d waiting)", name,
                            seconds[name], stage_log(out, st), len(running), len(pending))
                if on_done is not None:
                    on_done(st, dict(seconds))
    finally:
        stop_all()
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


def read_gap(run_dir: Path, max_step: int | None = None) -> dict[str, float]:
    """val/gap and val/gap_bin<k> of the last validation in a run's CSV log
    (``<run>/csv/version_*/metrics.csv``); {} when the run never validated. ``max_step``:
    the last validation of the weights at or before that optimizer step (the log's ``step``
    of a validation after N optimizer steps is N - 1, Lightning's index of the last batch),
    what a run of ``max_step`` steps would have logged last."""
    last: dict[str, float] = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as f:
            for record in csv.DictReader(f):
                if max_step is not None and int(record["step"]) >= max_step:
                    continue
                if record.get("val/gap"):
                    last = {k: float(v) for k, v in record.items()
                            if k.startswith("val/gap") and v}
    return last


def ladder_rows(summaries: dict[str, dict[str, Any]], ladder: Sequence[Model],
                gaps: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """Table rows from each model's summary.json (keyed by run name; models without one are
    left out: a partial table), then a source row. ``gaps``: ``read_gap`` per run; a
    model's rows carry its last val/gap."""
    gaps = gaps or {}
    rows = []
    evaluated = [model for model in ladder if model.run in summaries]
    for model in evaluated:
        for row in summaries[model.run]["rows"]:
            rows.append({"model": model.label, "steps": int(row["steps"]),
                         **{key: row.get(key) for key in ROW_KEYS},
                         "training_gap": gaps.get(model.run, {}).get("val/gap"),
                         "oracle_impossible_fraction": row.get("oracle_impossible_fraction"),
                         "seconds_per_sample": row.get("seconds_per_sample"),
                         "note": row_note(row)})
    reference = summaries[evaluated[0].run]["reference"]
    rows.append({"model": "source (held-out data)", "steps": None,
                 **{key: reference.get(key) for key in ROW_KEYS},
                 "network_calls_per_sample": None, "training_gap": None,
                 "oracle_impossible_fraction": reference.get("oracle_impossible_fraction"),
                 "seconds_per_sample": None, "note": "samples of the source itself"})
    return rows


def plot_gap_vs_t(gap: dict[str, float], out_path: Path) -> bool:
    """FLM's last val/gap_bin<k> against the bin centres of t; False when there is none."""
    points = sorted(((k + 0.5) / GAP_TIME_BINS, value) for key, value in gap.items()
                    if (k := _bin_index(key)) is not None)
    if not points:
        return False
    import matplotlib.pyplot as plt  # evaluation.plots has chosen the Agg backend

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(*zip(*points), marker="o", label="FLM (last validation)")
    ax.axhline(0.0, color="black", linestyle="--", label="exact denoiser")
    ax.set_xlabel("model time t (alpha)")
    ax.set_ylabel("cross-entropy gap to the exact denoiser (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return True


def _bin_index(key: str) -> int | None:
    prefix = "val/gap_bin"
    return int(key[len(prefix):]) if key.startswith(prefix) else None


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


def band_rows(rows: Sequence[dict[str, Any]], ladder: Sequence[Model]) -> list[dict[str, Any]]:
    """Rows of the hybrid-band models with ``excess``: their oracle NLL/token minus the
    exact denoiser's at the same sampling steps (None without that row)."""
    labels = {m.label for m in ladder if m.run.startswith("band_")}
    exact = {row["steps"]: row["oracle_nll_per_token"] for row in rows
             if row["model"] == "exact denoiser"}
    out = []
    for row in rows:
        if row["model"] in labels:
            base = exact.get(row["steps"])
            excess = (row["oracle_nll_per_token"] - base
                      if _finite(base) and _finite(row["oracle_nll_per_token"]) else None)
            out.append({"model": row["model"], "steps": row["steps"],
                        "oracle_nll_per_token": row["oracle_nll_per_token"], "excess": excess})
    return out


def band_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| band | steps | oracle NLL/token | excess over exact |", "|---|---|---|---|"]
    for row in rows:
        nll, excess = row["oracle_nll_per_token"], row["excess"]
        lines.append(f"| {row['model']} | {row['steps']} | "
                     f"{f'{nll:.3f}' if _finite(nll) else 'inf'} | "
                     f"{'-' if excess is None else f'{excess:+.3f}'} |")
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
                  ladder: Sequence[Model], gaps: dict[str, dict[str, float]] | None = None,
                  quiet: bool = False) -> dict[str, Any]:
    """table.md, table.json, oracle_nll_vs_steps.png and (with FLM's val/gap) gap_vs_t.png
    under ``out``; returns the JSON. Models without a summary yet are left out, and the
    header says so (a partial table). ``quiet``: log the file names only."""
    gaps = gaps or {}
    rows = ladder_rows(summaries, ladder, gaps)
    evaluated = [m for m in ladder if m.run in summaries]
    first = summaries[evaluated[0].run]["rows"][0]
    source_entropy = float(first["source_entropy_per_token"])
    missing = [m.label for m in ladder if m.run not in summaries]
    partial = (f"PARTIAL: {len(evaluated)} of {len(ladder)} models evaluated so far "
               f"(missing: {', '.join(missing)}). " if missing else "")
    header = (f"{partial}Synthetic source (exact likelihood): entropy {source_entropy:.4f} nats/token "
              f"over the window (entropy rate {float(first['source_entropy_rate']):.4f}); "
              f"{settings['num_samples']} samples per row, seed {settings['seed']}. "
              "Gap = oracle NLL/token - source entropy/token; near-impossible = fraction of "
              "transitions with probability < 1e-3 under the source; training gap = the "
              "model's validation cross-entropy minus the exact denoiser's on the same noisy "
              "inputs (nats/token); sample entropy = mean unigram entropy of a sample (nats).")
    table = markdown_table(rows)
    bands = band_rows(rows, ladder)
    if bands:
        table += ("\n\nNetwork on one band of t, exact denoiser elsewhere (eval.denoiser=hybrid"
                  "): oracle NLL/token and its excess over the exact denoiser's at the same "
                  "steps (docs/math.md §12)\n\n" + band_table(bands))
    (out / "table.md").write_text(f"{header}\n\n{table}\n")
    result = {"source_entropy_per_token": source_entropy,
              "source_entropy_rate": float(first["source_entropy_rate"]),
              "settings": settings, "training_gaps": gaps, "rows": rows, "bands": bands}
    if "diagnostics" in summaries.get("flm", {}):
        result["flm_diagnostics"] = summaries["flm"]["diagnostics"]
        plot_diagnostics({"diagnostics": summaries["flm"]["diagnostics"]},
                         str(out / "kl_vs_t.png"))
    (out / "table.json").write_text(json.dumps(_json_safe(result), indent=2))
    plot_summaries = [{"model_name": m.label, "rows": summaries[m.run]["rows"]}
                      for m in evaluated]
    plot_metric_vs_steps(plot_summaries, "oracle_nll_per_token", "oracle NLL per token (nats)",
                         str(out / "oracle_nll_vs_steps.png"),
                         {"source entropy per token": source_entropy})
    plotted = plot_gap_vs_t(gaps.get("flm", {}), out / "gap_vs_t.png")
    logger.info("%s%swrote %s, %s, %s%s", "" if quiet else f"{header}\n\n{table}\n\n",
                "(partial table) " if missing else "", out / "table.md",
                out / "table.json", out / "oracle_nll_vs_steps.png",
                f", {out / 'gap_vs_t.png'}" if plotted else " (no val/gap: no gap plot)")
    return result


def stage_env(device: str, jobs: int = 1) -> dict[str, str]:
    """The stages' environment: offline, wandb off; ``device=cpu`` hides CUDA (sample_eval
    picks it whenever it is visible); with ``jobs`` stages at a time each gets its share of
    the cores as intra-op threads (unless OMP_NUM_THREADS is set already)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="directory of the stage runs, "
                   "table.md, table.json and the plots (must be new or empty)")
    p.add_argument("--size", choices=sorted(PRESETS), default=None,
                   help="preset: quick (CI, a few minutes on a CPU), cpu (default, ~40 min on "
                   "2 cores), gpu (one H100 / H200, sized for < 10 min; implies --device gpu)")
    p.add_argument("--quick", action="store_true", help="alias of --size quick")
    p.add_argument("--device", choices=sorted(DEVICE_ACCELERATORS), default=None,
                   help="trainer.accelerator of every stage; cpu also hides CUDA from sampling "
                   "(default: gpu for --size gpu, else cpu)")
    p.add_argument("--flm-steps", type=int, default=None,
                   help="FLM optimizer steps (default: the preset's)")
    p.add_argument("--distill-steps", type=int, default=None,
                   help="optimizer steps of each distillation stage (default: the preset's)")
    p.add_argument("--baseline-steps", type=int, default=None,
                   help="optimizer steps of each baseline (default: the preset's, else FLM's)")
    p.add_argument("--budgets", type=_budget_list, default=None,
                   help="comma-separated optimizer budgets, e.g. 4000,8000: FLM and the "
                   "baselines trained once to the largest, evaluated (and FLM distilled) "
                   "from the checkpoint at each budget's step, then the budget table and "
                   "plot; replaces --flm-steps and --baseline-steps")
    p.add_argument("--diagnose", action="store_true",
                   help="FLM's evaluation with eval.diagnose=true: KL(exact || FLM) per tenth "
                   "of t on its trajectories and on data states (table.json, kl_vs_t.png)")
    p.add_argument("--bands", type=_band_list, default=(),
                   help="hybrid bands of t, e.g. 0-0.2,0.2-0.6,0.6-1,0.2-1: FLM's checkpoint "
                   "sampled with the network on each band and the exact denoiser elsewhere, "
                   "and a band table")
    p.add_argument("--jobs", type=int, default=None,
                   help="stages run at a time, each once the checkpoints it reads exist "
                   "(default: the preset's; gpu: 4 processes share the GPU, whose eager steps "
                   "are launch-bound)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every stage, e.g. "
                   "data.source_seed=3 seed=2 (after the options, or after --)")
    args = p.parse_args(argv)
    if args.quick and args.size not in (None, "quick"):
        p.error(f"--quick and --size {args.size} disagree: pass one of them")
    args.size = "quick" if args.quick else (args.size or "cpu")
    args.device = args.device or ("gpu" if args.size == "gpu" else "cpu")
    if args.budgets is not None and (args.flm_steps or args.baseline_steps):
        p.error("--budgets sets the FLM and baseline optimizer steps of each ladder: drop "
                "--flm-steps / --baseline-steps")
    for name in ("flm_steps", "distill_steps", "baseline_steps", "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}={value}: use a positive number")
    return args


def _band_list(text: str) -> list[tuple[float, float]]:
    """``--bands``: '0-0.2,0.2-1' -> [(0.0, 0.2), (0.2, 1.0)], each 0 <= lo <= hi <= 1."""
    bands = []
    for part in text.split(","):
        try:
            lo, hi = (float(v) for v in part.split("-"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--bands {text!r}: comma-separated lo-hi pairs, "
                                             "e.g. 0-0.2,0.2-1") from None
        if not 0.0 <= lo <= hi <= 1.0:
            raise argparse.ArgumentTypeError(f"--bands: {part} needs 0 <= lo <= hi <= 1")
        bands.append((lo, hi))
    return bands


def _budget_list(text: str) -> list[int]:
    """``--budgets``: '4000,8000' -> [4000, 8000] (distinct positive integers, in order)."""
    try:
        budgets = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budgets {text!r}: comma-separated integers, "
                                         "e.g. 4000,8000") from None
    if not budgets or min(budgets) < 1 or len(set(budgets)) < len(budgets):
        raise argparse.ArgumentTypeError(f"--budgets {text!r}: distinct positive integers")
    return budgets


def ladder_config(shared: Sequence[str]) -> DictConfig:
    """The config the stages compose (experiment config + shared overrides)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="config", overrides=[EXPERIMENT, *shared])


def _terminated(signum, frame) -> None:
    raise SystemExit(f"stopped by signal {signum}: the running stages are stopped; table.md "
                     "holds the models evaluated so far")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    signal.signal(signal.SIGTERM, _terminated)  # e.g. `timeout`: stop the stages too
    args = parse_args(argv)
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty: the stages resume from and overwrite "
                         "what is there; pass a new directory")
    out.mkdir(parents=True, exist_ok=True)
    preset = PRESETS[args.size]
    distill_steps = args.distill_steps or preset.distill_steps
    if args.budgets is None:
        flm_steps = args.flm_steps or preset.flm_steps
        baseline_steps = args.baseline_steps or preset.baseline_steps or flm_steps
        return run_ladder(out, args, preset, flm_steps, distill_steps, baseline_steps)
    return run_budgets(out, args, preset, args.budgets, distill_steps)


def shared_overrides(args: argparse.Namespace, preset: Preset) -> list[str]:
    """Overrides of every stage: the device, the preset's, the user's."""
    return [f"trainer.accelerator={DEVICE_ACCELERATORS[args.device]}",
            *(["trainer.devices=1"] if args.device == "gpu" else []),
            *preset.overrides, *args.overrides]


def ladder_models(args: argparse.Namespace, preset: Preset,
                  config: DictConfig) -> tuple[Model, ...]:
    from algo import ALGORITHMS  # the baselines present in this checkout

    return models(preset, int(config.model.length), list(ALGORITHMS), diagnose=args.diagnose,
                  bands=args.bands)


def run_ladder(out: Path, args: argparse.Namespace, preset: Preset, flm_steps: int,
               distill_steps: int, baseline_steps: int) -> dict[str, Any]:
    """Train and evaluate one ladder under ``out`` and write its table (``write_outputs``)."""
    shared = shared_overrides(args, preset)
    ladder = ladder_models(args, preset, ladder_config(shared))
    jobs = args.jobs or preset.jobs
    env = stage_env(args.device, jobs)
    stages = stage_commands(out, preset, flm_steps, distill_steps, shared, ladder,
                            baseline_steps)
    settings = {"size": args.size, "device": args.device, "jobs": jobs, "flm_steps": flm_steps,
                "distill_steps": distill_steps, "baseline_steps": baseline_steps,
                "shared_overrides": [EXPERIMENT, *shared]}
    logger.info("%d stages, up to %d at a time", len(stages), jobs)
    summaries: dict[str, dict[str, Any]] = {}

    def table_so_far(stage: Stage, seconds: dict[str, float]) -> None:
        """After each evaluation: the table of the models evaluated so far (a run cut short
        keeps what it finished)."""
        if stage.name.startswith("sample_eval") and len(summaries) + 1 < len(ladder):
            summaries[stage.run] = read_summary(out, stage.run)
            write_outputs(out, summaries, {**settings, **run_settings(summaries),
                                           "stage_seconds": seconds}, ladder,
                          read_gaps(out, ladder), quiet=True)

    start = time.perf_counter()
    seconds = run_stages(stages, out, env, jobs, on_done=table_so_far)
    summaries = {m.run: read_summary(out, m.run) for m in ladder}
    settings.update(run_settings(summaries), stage_seconds=seconds,
                    total_seconds=time.perf_counter() - start)
    return write_outputs(out, summaries, settings, ladder, read_gaps(out, ladder))


def budget_gaps(out: Path, budget: int, ladder: Sequence[Model]) -> dict[str, dict[str, float]]:
    """``read_gap`` of each model of budget ``budget``'s ladder; a model trained once to the
    largest budget: its last validation at or before step ``budget``."""
    once = {m.run for m in trained_once(ladder)}
    gaps = {}
    for m in ladder:
        gap = (read_gap(out / m.run, budget) if m.run in once
               else read_gap(out / budget_run(budget, m.run)))
        if gap:
            gaps[m.run] = gap
    return gaps


def run_budgets(out: Path, args: argparse.Namespace, preset: Preset, budgets: Sequence[int],
                distill_steps: int) -> dict[str, Any]:
    """``--budgets``: the stages of ``budget_stage_commands``, then each budget's ladder table
    under ``out/budget_<B>`` (``write_outputs``, the models no budget changes in every one)
    and the budget table and plot in ``out`` (``write_budget_outputs``)."""
    shared = shared_overrides(args, preset)
    config = ladder_config(shared)
    ladder = ladder_models(args, preset, config)
    cb = config.callbacks
    last_every = (int(cb.checkpoint_last.every_n_train_steps) if "checkpoint_last" in cb
                  else None)
    jobs = args.jobs or preset.jobs
    env = stage_env(args.device, jobs)
    stages = budget_stage_commands(out, preset, budgets, distill_steps, shared, ladder,
                                   last_every)
    longest = max(budgets)
    settings = {"size": args.size, "device": args.device, "jobs": jobs, "budgets": budgets,
                "trained_to": longest, "checkpoint_every": math.gcd(*budgets),
                "distill_steps": distill_steps, "shared_overrides": [EXPERIMENT, *shared]}

    def budget_settings(budget: int, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {**settings, "flm_steps": budget, "baseline_steps": budget,
                "checkpoint": f"step {budget} of the run to {longest}",
                **run_settings(summaries)}

    logger.info("%d stages, up to %d at a time; FLM%s trained once to %d steps, evaluated at "
                "%s", len(stages), jobs, "".join(f", {m.label}" for m in trained_once(ladder)
                                                 if m.run != "flm"),
                longest, ", ".join(map(str, budgets)))
    evaluated: set[str] = set()

    def tables_so_far(stage: Stage, seconds: dict[str, float]) -> None:
        """After each evaluation: the table of each budget it belongs to, with the models
        evaluated so far (a run cut short keeps what it finished)."""
        if not stage.name.startswith("sample_eval"):
            return
        evaluated.add(stage.run)
        for budget in budgets:
            runs = {m.run: budget_run(budget, m.run) for m in ladder}
            if stage.run not in runs.values():
                continue
            done = {run: read_summary(out, where) for run, where in runs.items()
                    if where in evaluated}
            if len(done) < len(ladder):
                write_outputs(budget_dir(out, budget), done, budget_settings(budget, done),
                              ladder, budget_gaps(out, budget, ladder), quiet=True)

    for budget in budgets:  # its tables may come before any of its stages starts
        budget_dir(out, budget).mkdir()
    start = time.perf_counter()
    seconds = run_stages(stages, out, env, jobs, on_done=tables_so_far)
    results = {}
    for budget in budgets:
        summaries = {m.run: read_summary(out, budget_run(budget, m.run)) for m in ladder}
        results[budget] = write_outputs(budget_dir(out, budget), summaries,
                                        budget_settings(budget, summaries), ladder,
                                        budget_gaps(out, budget, ladder))
    settings.update(stage_seconds=seconds, total_seconds=time.perf_counter() - start)
    return write_budget_outputs(out, results, settings)


BUDGET_COLUMNS = (("model", "model", "{}"), ("budget", "optimizer steps", "{}"),
                  ("steps", "sampling steps", "{}"),
                  ("oracle_nll_per_token", "oracle NLL/token", "{:.3f}"),
                  ("entropy_gap", "gap to source entropy", "{:+.3f}"),
                  ("training_gap", "training gap (val/gap)", "{:.4f}"), ("note", "note", "{}"))


def budget_rows(results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of every budget's ladder table with their budget (the FLM / baseline optimizer
    steps; None for a model no budget changes, whose rows, the same in every ladder, are
    taken once), budgets ascending; one source row."""
    rows, source, free_done = [], None, False
    for budget in sorted(results):
        for row in results[budget]["rows"]:
            if row["steps"] is None:
                source = source or row
                continue
            free = row["model"] in BUDGET_FREE_LABELS
            if not (free and free_done):
                rows.append({**row, "budget": None if free else budget})
        free_done = True
    return rows + ([{**source, "budget": None}] if source else [])


def write_budget_outputs(out: Path, results: dict[int, dict[str, Any]],
                         settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """budget_table.md, budget_table.json and oracle_nll_vs_budget.png under ``out``;
    ``settings``: the run's (``stage_seconds``: every stage's wall time), each budget's
    ladder settings under ``ladders``."""
    rows = budget_rows(results)

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        if value is None or value == "":
            return "-"
        if isinstance(value, float) and not math.isfinite(value):
            return "inf"
        return fmt.format(value)
    lines = ["| " + " | ".join(title for _, title, _ in BUDGET_COLUMNS) + " |",
             "|" + "|".join("---" for _ in BUDGET_COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(row, key, fmt) for key, _, fmt in BUDGET_COLUMNS) + " |"
              for row in rows]
    table = "\n".join(lines)
    first = next(iter(results.values()))
    header = (f"Oracle NLL per token against the optimizer budget of FLM, MDLM and AR (each "
              f"trained once to the largest budget and evaluated from its checkpoint at each "
              f"budget's step; the distillations start from the FLM of their budget; '-': a "
              f"model no budget changes). Source entropy "
              f"{first['source_entropy_per_token']:.4f} nats/token.")
    (out / "budget_table.md").write_text(f"{header}\n\n{table}\n")
    result = {"budgets": sorted(results), "rows": rows, "settings": settings or {},
              "ladders": {str(b): r["settings"] for b, r in results.items()}}
    (out / "budget_table.json").write_text(json.dumps(_json_safe(result), indent=2))
    plot_nll_vs_budget(rows, float(first["source_entropy_per_token"]),
                       out / "oracle_nll_vs_budget.png")
    logger.info("%s\n\n%s\n\nwrote %s, %s, %s", header, table, out / "budget_table.md",
                out / "budget_table.json", out / "oracle_nll_vs_budget.png")
    return result


def plot_nll_vs_budget(rows: Sequence[dict[str, Any]], source_entropy: float,
                       out_path: Path) -> None:
    """One panel per model with a budget: oracle NLL vs optimizer steps, one line per
    sampling-step count; the source entropy dashed."""
    import matplotlib.pyplot as plt  # evaluation.plots has chosen the Agg backend

    budgeted = [row for row in rows if row.get("budget") is not None]
    labels = list(dict.fromkeys(row["model"] for row in budgeted))
    fig, axes = plt.subplots(1, max(len(labels), 1), figsize=(4.5 * max(len(labels), 1), 4),
                             squeeze=False)
    for ax, label in zip(axes[0], labels):
        mine = [row for row in budgeted if row["model"] == label]
        for steps in sorted({row["steps"] for row in mine}):
            points = sorted((row["budget"], row["oracle_nll_per_token"]) for row in mine
                            if row["steps"] == steps and _finite(row["oracle_nll_per_token"]))
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{steps} sampling steps")
        ax.axhline(source_entropy, color="black", linestyle="--", label="source entropy")
        ax.set_xscale("log", base=2)
        ax.set_title(label)
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("oracle NLL per token (nats)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def read_summary(out: Path, run: str) -> dict[str, Any]:
    return json.loads((eval_dir(out, run) / "summary.json").read_text())


def read_gaps(out: Path, ladder: Sequence[Model]) -> dict[str, dict[str, float]]:
    return {m.run: gap for m in ladder if (gap := read_gap(out / m.run))}


def run_settings(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Samples per row and the sampling seed, read off any evaluated model."""
    first = next(iter(summaries.values()))
    return {"num_samples": first["num_samples"], "seed": first["seed"]}


if __name__ == "__main__":
    with cli.user_errors():  # a user's mistake: one line, exit 2
        main()
