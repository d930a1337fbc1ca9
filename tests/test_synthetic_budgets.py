"""scripts/synthetic_table.py --budgets: argument checks, the stage plan (FLM and the
baselines trained once, to the largest budget; one evaluation per budget checkpoint;
distillations per budget; the budget-free models once), stages that wait for the checkpoint
files they read, and the driver end to end on the quick preset with stand-in stages, down
to the budget table and plot. tests/test_budget_checkpoints.py checks, with real training,
that a checkpoint at step B of the longer run is the run of budget B."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import compose_config
from tests.test_synthetic_ladder import load_driver


def test_budget_arguments():
    driver = load_driver()
    assert driver.parse_args(["--out", "x", "--budgets", "4000,8000"]).budgets == [4000, 8000]
    for bad in ("4000,4000", "0,10", "4k"):
        with pytest.raises(SystemExit):
            driver.parse_args(["--out", "x", "--budgets", bad])
    with pytest.raises(SystemExit):
        driver.parse_args(["--out", "x", "--budgets", "10,20", "--flm-steps", "5"])


def value(stage, key: str) -> str:
    """The value of override ``key`` in a stage (quotes stripped); KeyError without it."""
    found = [o.split("=", 1)[1].strip("'") for o in stage.overrides if o.startswith(key + "=")]
    if not found:
        raise KeyError(f"{stage.name} has no {key}")
    return found[-1]


@pytest.mark.parametrize("budgets", [[2000, 4000], [3000, 1000, 4000]])
def test_budget_plan_trains_each_model_once_and_evaluates_every_budget(tmp_path, budgets):
    driver = load_driver()
    preset = driver.PRESETS["gpu"]
    shared = ["trainer.accelerator=cpu", *preset.overrides]
    ladder = driver.models(preset, 64, ["flm", "mdlm", "ar"], bands=[(0.2, 1.0)])
    stages = driver.budget_stage_commands(tmp_path, preset, budgets, 250, shared, ladder, 1000)
    by_name = {st.name: st for st in stages}
    assert len(by_name) == len(stages)  # unique names
    longest, every = max(budgets), math.gcd(*budgets)
    trains = [st for st in stages if st.name.startswith("train ")]
    # FLM, MDLM and AR: one run each, to the largest budget, a checkpoint every gcd steps
    for run in ("flm", "mdlm", "ar"):
        stage = by_name[f"train {run}"]
        assert value(stage, "trainer.max_steps") == str(longest)
        assert value(stage, "callbacks.checkpoint_every_n_steps.every_n_train_steps") == str(
            every)
        assert all(b % every == 0 for b in budgets)
        assert value(stage, "hydra.run.dir") == str(tmp_path / run)
    # the budget-free models once, at the top level
    for run in driver.BUDGET_FREE_RUNS:
        assert f"sample_eval {run}" in by_name
    assert {"train stage1_oracle", "train fmlm_oracle"} <= set(by_name)
    # per budget: each model evaluated from its checkpoint at that step, the distillations
    # from FLM's, each waiting for the file (no need on the training stage that writes it)
    for budget in budgets:
        prefix = f"budget_{budget}"
        flm_ckpt = driver.step_checkpoint(tmp_path, "flm", budget)
        assert flm_ckpt.name == f"step{budget:08d}.ckpt"
        for run in ("flm", "mdlm", "ar", "band_0.2_1"):
            stage = by_name[f"sample_eval {prefix}/{run}"]
            source = "flm" if run.startswith("band") else run
            ckpt = driver.step_checkpoint(tmp_path, source, budget)
            assert value(stage, "eval.checkpoint_path") == str(ckpt)
            assert stage.reads == ((f"train {source}", ckpt),) and stage.needs == ()
            assert value(stage, "eval.output_dir") == str(tmp_path / prefix / run / "eval")
        stage1, fmlm = by_name[f"train {prefix}/stage1"], by_name[f"train {prefix}/fmlm"]
        assert value(stage1, "algo.teacher_path") == str(flm_ckpt)
        assert value(fmlm, "algo.teacher_f_path") == str(flm_ckpt)
        assert value(fmlm, "algo.teacher_g_path") == str(
            driver.checkpoint(tmp_path / prefix, "stage1"))
        assert fmlm.needs == (f"train {prefix}/stage1",)
        assert stage1.reads == fmlm.reads == (("train flm", flm_ckpt),)
        assert value(stage1, "trainer.max_steps") == "250"
        assert {f"sample_eval {prefix}/stage1", f"sample_eval {prefix}/fmlm"} <= set(by_name)
    assert len(trains) == 3 + 2 + 2 * len(budgets)  # nothing else is trained
    assert len(stages) == len(trains) + len(driver.BUDGET_FREE_RUNS) + len(budgets) * 6
    rank = driver.critical_order(stages)
    assert min(rank, key=rank.get) == "train flm"
    for st in stages:
        for need in (*st.needs, *(writer for writer, _ in st.reads)):
            assert rank[need] < rank[st.name]
    for name in ("train flm", f"train budget_{budgets[0]}/fmlm",
                 f"sample_eval budget_{budgets[0]}/mdlm"):  # each composes
        overrides = [o for o in by_name[name].overrides if not o.startswith("hydra.")]
        config = compose_config(overrides)
        if name == "train flm":  # two checkpoint callbacks of one period: refused by
            cb = config.callbacks  # runtime/config.py, so last.ckpt's period moves
            assert cb.checkpoint_every_n_steps.every_n_train_steps == every
            assert cb.checkpoint_every_n_steps.save_top_k == -1
            assert cb.checkpoint_last.every_n_train_steps != every


# ---- stand-in stages: files at their real paths, no training ---------------------------------
STAND_IN = r"""
import json, os, sys, time
from pathlib import Path
log, args = Path(sys.argv[1]), dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
get = lambda key: args[key].strip("'") if key in args else None
name = sys.argv[2]
start = time.time()

def write(path, content):  # atomically, like runtime/checkpointing.write_atomically
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / ("." + path.name + ".tmp")
    tmp.write_text(json.dumps(content))
    os.replace(tmp, path)

def budget_of(path):  # what a stand-in checkpoint records: the FLM / baseline steps behind it
    return json.loads(Path(path).read_text())["budget"]

if get("mode") == "sample_eval":
    source = get("eval.checkpoint_path")
    budget = budget_of(source) if source else 0
    rows = [{"steps": int(s), "oracle_nll_per_token": 3.0 - budget / 100 - int(s) / 1000,
             "oracle_gen_ppl": 1.0, "oracle_near_impossible_fraction": 0.0, "entropy_mean": 2.0,
             "entropy_gap": 0.1, "network_calls_per_sample": int(s),
             "source_entropy_per_token": 2.4, "source_entropy_rate": 2.3}
            for s in get("sampling.steps").strip("[]").split(",")]
    write(Path(get("eval.output_dir")) / "summary.json",
          {"num_samples": 4, "seed": 1, "rows": rows, "reference": dict(rows[0], steps=None)})
else:
    run = Path(get("hydra.run.dir"))
    teacher = get("algo.teacher_path") or get("algo.teacher_f_path")
    every = int(get("callbacks.checkpoint_every_n_steps.every_n_train_steps") or 0)
    for step in range(1, int(get("trainer.max_steps")) + 1):
        time.sleep(0.1)
        budget = budget_of(teacher) if teacher and teacher != "oracle" else step
        if every and step % every == 0:
            write(run / "checkpoints" / f"step{step:08d}.ckpt", {"budget": budget})
    write(run / "checkpoints" / "last.ckpt", {"budget": budget})
log.write_text(json.dumps({"name": name, "start": start, "end": time.time()}))
"""


def stand_in(folder: Path):
    started = itertools.count()

    def command(stage) -> list[str]:
        log = folder / f"{next(started)}.json"
        return [sys.executable, "-c", STAND_IN, str(log), stage.name, *stage.overrides]
    return command


def test_budgets_end_to_end_with_stand_in_stages(tmp_path, monkeypatch):
    """``main --budgets 10,30 --size quick``: the real stage plan, scheduler and tables; each
    stand-in stage writes what main would (checkpoints at the budget steps, summary.json)
    with numbers that record which budget's checkpoint they came from."""
    driver = load_driver()
    monkeypatch.setitem(driver.PRESETS, "quick", dataclasses.replace(
        driver.PRESETS["quick"], baselines=("mdlm",)))
    timing = tmp_path / "timing"
    timing.mkdir()
    monkeypatch.setattr(driver, "run_stages", functools.partial(driver.run_stages,
                                                                command=stand_in(timing)))
    monkeypatch.setattr(driver.signal, "signal", lambda *a: None)
    out = tmp_path / "b"
    result = driver.main(["--out", str(out), "--budgets", "10,30", "--size", "quick",
                          "--jobs", "8", "--bands", "0.2-1"])
    spans = {span["name"]: span for span in (json.loads(p.read_text())
                                             for p in timing.glob("*.json"))}
    trains = sorted(name for name in spans if name.startswith("train"))
    assert trains == sorted(["train flm", "train mdlm", "train stage1_oracle",
                             "train fmlm_oracle", "train budget_10/stage1",
                             "train budget_10/fmlm", "train budget_30/stage1",
                             "train budget_30/fmlm"])
    # the budget-10 evaluation read step 10 while the run to 30 went on
    assert spans["sample_eval budget_10/flm"]["start"] < spans["train flm"]["end"]
    rows = result["rows"]

    def nll(model: str, budget) -> dict[int, float]:
        return {r["steps"]: r["oracle_nll_per_token"] for r in rows
                if r["model"] == model and r["budget"] == budget}
    for budget in (10, 30):  # each budget's rows from its own checkpoint
        for model in ("FLM", "MDLM", "stage-1 map", "FMLM", driver.band_label((0.2, 1.0))):
            got = nll(model, budget)
            assert got and all(v == pytest.approx(3.0 - budget / 100 - s / 1000)
                               for s, v in got.items()), (model, budget)
        table = json.loads((out / f"budget_{budget}" / "table.json").read_text())
        assert table["settings"]["flm_steps"] == budget
        assert {r["model"] for r in table["rows"]} >= {"exact denoiser", "FMLM (exact teacher)"}
    for model in driver.BUDGET_FREE_LABELS:  # once, with no budget
        assert nll(model, None) and not any(r["model"] == model and r["budget"] is not None
                                            for r in rows)
    assert sum(r["model"] == "exact denoiser" for r in rows) == len(
        driver.PRESETS["quick"].oracle_sampling_steps)
    assert rows[-1]["model"] == "source (held-out data)"
    saved = json.loads((out / "budget_table.json").read_text())
    assert saved["budgets"] == [10, 30] and set(saved["ladders"]) == {"10", "30"}
    assert set(saved["settings"]["stage_seconds"]) == set(spans)  # every stage's wall time
    table = (out / "budget_table.md").read_text()
    assert "| FLM | 30 | 64 | 2.636 |" in table
    assert (out / "oracle_nll_vs_budget.png").stat().st_size > 0


# ---- the scheduler's file waits --------------------------------------------------------------
WRITER = r"""
import json, os, sys, time
folder, name, write_after, end_after = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
start = time.time()
if write_after >= 0:
    time.sleep(write_after)
    with open(os.path.join(folder, ".file.tmp"), "w") as f:
        f.write("x")
    os.replace(os.path.join(folder, ".file.tmp"), os.path.join(folder, "file"))
time.sleep(max(0.0, end_after - (time.time() - start)))
with open(os.path.join(folder, name + ".json"), "w") as f:
    json.dump({"start": start, "end": time.time()}, f)
"""


def writer_command(folder: Path, write_after: float):
    def command(stage) -> list[str]:
        writes = stage.run == "writer"
        return [sys.executable, "-c", WRITER, str(folder), stage.run,
                str(write_after if writes else -1), "1.5" if writes else "0"]
    return command


def test_a_stage_starts_once_the_file_it_reads_exists(tmp_path):
    driver = load_driver()
    stages = [driver.Stage("train writer", []),
              driver.Stage("sample_eval reader", [], reads=(("train writer",
                                                              tmp_path / "file"),))]
    driver.run_stages(stages, tmp_path, dict(os.environ), jobs=2, poll_seconds=0.05,
                      command=writer_command(tmp_path, 0.5))
    writer = json.loads((tmp_path / "writer.json").read_text())
    reader = json.loads((tmp_path / "reader.json").read_text())
    assert writer["start"] + 0.5 <= reader["start"] < writer["end"]


def test_a_stage_that_never_writes_what_another_reads_is_an_error(tmp_path):
    driver = load_driver()
    stages = [driver.Stage("train writer", []),
              driver.Stage("sample_eval reader", [], reads=(("train writer",
                                                              tmp_path / "file"),))]
    start = time.perf_counter()
    with pytest.raises(SystemExit, match="'train writer' ended without writing"):
        driver.run_stages(stages, tmp_path, dict(os.environ), jobs=2, poll_seconds=0.05,
                          command=writer_command(tmp_path, -1))
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "reader.json").exists()


def test_a_budget_ladder_reads_the_validation_of_its_own_step(tmp_path):
    """A run trained once to the largest budget: budget B's training gap is the last
    validation at or before step B (logged at step index B - 1)."""
    driver = load_driver()
    metrics = tmp_path / "flm" / "csv" / "version_0" / "metrics.csv"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("epoch,step,train/loss,val/gap,val/gap_bin0\n"
                       "0,9,,0.5,0.6\n0,14,3.0,,\n0,19,,0.25,0.3\n")
    assert driver.read_gap(tmp_path / "flm", 10) == {"val/gap": 0.5, "val/gap_bin0": 0.6}
    assert driver.read_gap(tmp_path / "flm", 19) == {"val/gap": 0.5, "val/gap_bin0": 0.6}
    assert driver.read_gap(tmp_path / "flm", 20) == {"val/gap": 0.25, "val/gap_bin0": 0.3}
    assert driver.read_gap(tmp_path / "flm") == driver.read_gap(tmp_path / "flm", 20)


def test_band_and_diagnose_stages_and_the_band_table(tmp_path):
    driver = load_driver()
    args = driver.parse_args(["--out", "x", "--diagnose", "--bands", "0-0.2,0.2-1"])
    assert args.bands == [(0.0, 0.2), (0.2, 1.0)] and args.diagnose
    with pytest.raises(SystemExit):
        driver.parse_args(["--out", "x", "--bands", "0.6-0.2"])
    preset = driver.PRESETS["quick"]
    ladder = driver.models(preset, 16, ["flm"], diagnose=True, bands=args.bands)
    stages = {s.name: s for s in driver.stage_commands(
        tmp_path, preset, 10, 5, [], ladder)}
    band = stages["sample_eval band_0.2_1"]
    assert band.needs == ("train flm",)
    assert "eval.denoiser=hybrid" in band.overrides
    assert "eval.hybrid_band=[0.2,1.0]" in band.overrides
    assert f"eval.checkpoint_path='{tmp_path / 'flm' / 'checkpoints' / 'last.ckpt'}'" in (
        band.overrides)
    assert "eval.diagnose=true" in stages["sample_eval flm"].overrides
    assert "train band_0.2_1" not in stages
    rows = [{"model": "exact denoiser", "steps": 4, "oracle_nll_per_token": 2.5},
            {"model": "exact denoiser", "steps": 8, "oracle_nll_per_token": 2.45},
            {"model": driver.band_label((0.2, 1.0)), "steps": 4, "oracle_nll_per_token": 2.8},
            {"model": driver.band_label((0.2, 1.0)), "steps": 8,
             "oracle_nll_per_token": float("inf")},
            {"model": driver.band_label((0.0, 0.2)), "steps": 16, "oracle_nll_per_token": 2.6}]
    bands = driver.band_rows(rows, ladder)
    assert [b["excess"] for b in bands] == [pytest.approx(0.3), None, None]
    assert "| FLM on [0.2, 1), exact elsewhere | 4 | 2.800 | +0.300 |" in driver.band_table(bands)
