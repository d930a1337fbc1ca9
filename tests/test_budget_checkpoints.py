"""What ``scripts/synthetic_table.py --budgets`` relies on: the checkpoint at step B of one run
to the largest budget is the run of budget B. Checked on the quick preset's settings, with
the driver's own training overrides, against an independent run of B steps: weights, EMA,
optimizer and scheduler state, data-sampler position, loop counters and RNG states."""

from __future__ import annotations

import dataclasses
import subprocess

import numpy as np
import pytest
import torch

from tests.test_synthetic_ladder import ROOT, load_driver

BUDGET = 10  # optimizer steps: past the quick preset's 5 warm-up steps
# entries that name the run rather than its state: the callbacks' settings (the periodic
# interval is in their state key), the config (trainer.max_steps) and the run's id
RUN_IDENTITY = ("callbacks", "hyper_parameters", "run_id")


def assert_same(a, b, where: str = "") -> None:
    """``a`` and ``b`` equal exactly, tensor by tensor (a deterministic CPU run)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs (max |diff| {(a - b).abs().max()})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{k}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def train_together(driver, stages_and_logs) -> None:
    """Run the training stages at the same time (each its own process, as in the driver)."""
    procs = []
    for stage, log in stages_and_logs:
        with open(log, "w") as f:
            procs.append((subprocess.Popen(driver.main_command(stage), cwd=ROOT,
                                           env=driver.stage_env("cpu", len(stages_and_logs)),
                                           stdout=f, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]


@pytest.mark.parametrize("algo", ["flm", "mdlm", "ar"])
def test_checkpoint_at_a_budget_step_is_the_run_of_that_budget(tmp_path, algo):
    driver = load_driver()
    preset = dataclasses.replace(driver.PRESETS["quick"], baselines=("mdlm", "ar"))
    shared = ["trainer.accelerator=cpu", *preset.overrides]
    config = driver.ladder_config(shared)
    model = next(m for m in driver.models(preset, int(config.model.length), ["mdlm", "ar"])
                 if m.run == algo)
    long_out, short_out = tmp_path / "long", tmp_path / "short"
    stages = driver.budget_stage_commands(
        long_out, preset, [BUDGET, 2 * BUDGET], 1, shared, [model],
        int(config.callbacks.checkpoint_last.every_n_train_steps))
    long_run = next(st for st in stages if st.name == f"train {algo}")
    assert f"trainer.max_steps={2 * BUDGET}" in long_run.overrides  # one run, to the largest
    short_run = next(st for st in driver.stage_commands(short_out, preset, BUDGET, 1, shared,
                                                        [model], BUDGET)
                     if st.name == f"train {algo}")
    for out in (long_out, short_out):
        out.mkdir()
    train_together(driver, [(long_run, long_out / "train.log"),
                            (short_run, short_out / "train.log")])

    at_budget = torch.load(driver.step_checkpoint(long_out, algo, BUDGET), map_location="cpu",
                           weights_only=False)
    of_budget = torch.load(driver.checkpoint(short_out, algo), map_location="cpu",
                           weights_only=False)
    final = torch.load(driver.checkpoint(long_out, algo), map_location="cpu",
                       weights_only=False)
    assert at_budget["global_step"] == BUDGET and final["global_step"] == 2 * BUDGET
    assert "ema" in at_budget and at_budget["ema"]["num_updates"] > 0  # EMA compared too
    assert at_budget.keys() == of_budget.keys()
    for key in at_budget.keys() - set(RUN_IDENTITY):
        assert_same(at_budget[key], of_budget[key], key)
    # the steps after B changed the weights: the comparison above can tell runs apart
    assert any(not torch.equal(final["state_dict"][k], at_budget["state_dict"][k])
               for k in final["state_dict"])
