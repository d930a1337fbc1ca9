"""scripts/synthetic_table.py --budgets: argument checks, one ladder per budget (the
budget-free models once), the budget table and plot from the ladders' tables."""

from __future__ import annotations

import json

import pytest

from tests.test_synthetic_ladder import load_driver


def fake_result(budget: int, with_free: bool) -> dict:
    rows = [{"model": "FLM", "steps": s, "oracle_nll_per_token": 3.0 - budget / 1e4 - s / 100,
             "entropy_gap": 0.1, "training_gap": 0.05, "note": ""} for s in (4, 64)]
    rows.append({"model": "MDLM", "steps": 4, "oracle_nll_per_token": 2.9 - budget / 1e4,
                 "entropy_gap": 0.1, "training_gap": None, "note": ""})
    if with_free:
        rows.append({"model": "exact denoiser", "steps": 4, "oracle_nll_per_token": 2.4,
                     "entropy_gap": 0.0, "training_gap": None, "note": ""})
    rows.append({"model": "source (held-out data)", "steps": None,
                 "oracle_nll_per_token": 2.41, "note": "samples of the source itself"})
    return {"source_entropy_per_token": 2.4, "settings": {"flm_steps": budget}, "rows": rows}


def test_budget_arguments():
    driver = load_driver()
    assert driver.parse_args(["--out", "x", "--budgets", "4000,8000"]).budgets == [4000, 8000]
    for bad in ("4000,4000", "0,10", "4k"):
        with pytest.raises(SystemExit):
            driver.parse_args(["--out", "x", "--budgets", bad])
    with pytest.raises(SystemExit):
        driver.parse_args(["--out", "x", "--budgets", "10,20", "--flm-steps", "5"])


def test_one_ladder_per_budget_then_the_budget_table(tmp_path, monkeypatch):
    driver = load_driver()
    calls = []

    def run_ladder(out, args, preset, flm_steps, distill_steps, baseline_steps,
                   budget_free=True):
        calls.append((out.name, flm_steps, baseline_steps, budget_free))
        return fake_result(flm_steps, budget_free)
    monkeypatch.setattr(driver, "run_ladder", run_ladder)
    monkeypatch.setattr(driver.signal, "signal", lambda *a: None)
    result = driver.main(["--out", str(tmp_path / "b"), "--budgets", "4000,8000"])
    assert calls == [("budget_4000", 4000, 4000, True), ("budget_8000", 8000, 8000, False)]
    rows = result["rows"]
    flm = {(r["budget"], r["steps"]): r["oracle_nll_per_token"] for r in rows
           if r["model"] == "FLM"}
    assert flm == {(4000, 4): 3.0 - 0.4 - 0.04, (4000, 64): 3.0 - 0.4 - 0.64,
                   (8000, 4): 3.0 - 0.8 - 0.04, (8000, 64): 3.0 - 0.8 - 0.64}
    exact = [r for r in rows if r["model"] == "exact denoiser"]
    assert len(exact) == 1 and exact[0]["budget"] is None  # once, with no budget
    assert rows[-1]["model"] == "source (held-out data)"
    out = tmp_path / "b"
    assert json.loads((out / "budget_table.json").read_text())["budgets"] == [4000, 8000]
    table = (out / "budget_table.md").read_text()
    assert "| FLM | 8000 | 64 | 1.560 |" in table
    assert (out / "oracle_nll_vs_budget.png").stat().st_size > 0


def test_budget_ladders_leave_out_the_budget_free_models():
    driver = load_driver()
    preset = driver.PRESETS["gpu"]
    every = [m.run for m in driver.models(preset, 64, ["mdlm", "ar"])]
    later = [m.run for m in driver.models(preset, 64, ["mdlm", "ar"], budget_free=False)]
    assert set(every) - set(later) == set(driver.BUDGET_FREE_RUNS)
    assert {"flm", "stage1", "fmlm", "mdlm", "ar"} == set(later)


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
