"""The step-count ladder (scripts/synthetic_table.sh --quick) end to end, and its table code.

The ladder's numbers are checked against independent computations: the oracle NLL of the
saved samples re-scored by a plain loop over the chain's transition matrix, the source
entropy by an eigenvector stationary law, and the held-out reference row by Monte Carlo.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.synthetic import SyntheticSource
from tests.helpers import compose_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "synthetic_table.sh"
EXPECTED_STEPS = {"FLM": [1, 2, 4, 8, 16, 64, 256], "exact denoiser": [1, 2, 4, 8, 16, 64],
                  "stage-1 map": [1, 2, 4, 8], "FMLM": [1, 2, 4, 8],
                  "stage-1 map (exact teacher)": [1, 2, 4, 8],
                  "FMLM (exact teacher)": [1, 2, 4, 8]}
CALLS_PER_STEP = {"FLM": 1, "exact denoiser": 1, "stage-1 map": 2, "FMLM": 1,  # docs/math.md §4-6
                  "stage-1 map (exact teacher)": 2, "FMLM (exact teacher)": 1}
RUNS = {"FLM": "flm", "exact denoiser": "oracle", "stage-1 map": "stage1", "FMLM": "fmlm",
        "stage-1 map (exact teacher)": "stage1_oracle", "FMLM (exact teacher)": "fmlm_oracle"}
TRAINED = [run for run in RUNS.values() if run != "oracle"]


def load_driver():
    spec = importlib.util.spec_from_file_location("synthetic_table",
                                                  ROOT / "scripts" / "synthetic_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ladder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ladder") / "out"
    # offline, wandb disabled: the session's environment (tests/conftest.py)
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def ladder_source() -> tuple[SyntheticSource, int]:
    """The source and window length the --quick ladder trains on, from the same config."""
    driver = load_driver()
    config = compose_config([driver.EXPERIMENT, *driver.PRESETS["quick"].overrides])
    return SyntheticSource.from_config(config.data), int(config.model.length)


def loop_nll(transition: np.ndarray, initial: np.ndarray, ids: list[int]) -> float:
    """-log p(x) of one sequence by a plain loop over the chain's parameters."""
    nll = -math.log(initial[ids[0]])
    for a, b in zip(ids[:-1], ids[1:]):
        nll -= math.log(transition[a, b]) if transition[a, b] > 0 else -math.inf
    return nll


def test_quick_ladder_table_has_every_row(ladder):
    table = json.loads((ladder / "table.json").read_text())
    rows = table["rows"]
    for label, steps in EXPECTED_STEPS.items():
        model_rows = [r for r in rows if r["model"] == label]
        assert [r["steps"] for r in model_rows] == steps
        for row in model_rows:
            assert row["network_calls_per_sample"] == CALLS_PER_STEP[label] * row["steps"]
            nll = row["oracle_nll_per_token"]
            if nll is None:  # inf, written as null: the note must say why
                assert "impossible under the source" in row["note"]
                assert row["oracle_impossible_fraction"] > 0
            else:
                assert math.isfinite(nll) and row["note"] == ""
                assert row["oracle_gen_ppl"] == pytest.approx(math.exp(nll), rel=1e-9)
                assert row["entropy_gap"] == pytest.approx(
                    nll - table["source_entropy_per_token"], abs=1e-9)
    assert rows[-1]["model"].startswith("source")
    markdown = (ladder / "table.md").read_text()
    assert markdown.count("\n| FLM |") == 7 and markdown.count("\n| FMLM |") == 4
    assert markdown.count("\n| exact denoiser |") == 6
    assert (ladder / "oracle_nll_vs_steps.png").stat().st_size > 5000
    # FLM validated at steps 30 and 60: its rows carry the last val/gap, and the gap plot
    gaps = table["training_gaps"]["flm"]
    assert {f"val/gap_bin{k}" for k in range(10)} <= set(gaps)
    assert all(r["training_gap"] == gaps["val/gap"] for r in rows if r["model"] == "FLM")
    assert (ladder / "gap_vs_t.png").stat().st_size > 5000
    for run in TRAINED:  # every stage in its own run dir, through the real CLI
        assert (ladder / run / "checkpoints" / "last.ckpt").is_file()
        assert (ladder / run / "config_resolved.yaml").is_file()


def test_quick_ladder_numbers_match_independent_computations(ladder):
    table = json.loads((ladder / "table.json").read_text())
    source, length = ladder_source()
    # source entropy per token: stationary start, so H(pi) + (L - 1) * rate; pi from eig
    values, vectors = np.linalg.eig(source.transition_np.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    pi = pi / pi.sum()
    p = source.transition_np
    row_entropy = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(1)
    h_pi = -(pi * np.log(pi)).sum()
    expected = (h_pi + (length - 1) * pi @ row_entropy) / length
    assert table["source_entropy_per_token"] == pytest.approx(expected, rel=1e-8)

    by_key = {(r["model"], r["steps"]): r for r in table["rows"]}
    for label, run in RUNS.items():
        samples = json.loads((ladder / run / "eval" / "samples.json").read_text())
        for steps, records in samples["steps"].items():
            ids = [rec["token_ids"] for rec in records]
            assert all(len(x) == length for x in ids)
            nll = sum(loop_nll(source.transition_np, source.initial_np, x) for x in ids)
            expected_nll = nll / (len(ids) * length)
            row = by_key[(label, int(steps))]
            low = [source.transition_np[a, b] < 1e-3 for x in ids for a, b in zip(x[:-1], x[1:])]
            assert row["oracle_near_impossible_fraction"] == pytest.approx(np.mean(low), abs=1e-12)
            reported = row["oracle_nll_per_token"]
            if math.isfinite(expected_nll):
                assert reported == pytest.approx(expected_nll, rel=1e-9)
            else:
                assert reported is None

    # the held-out row is a Monte Carlo estimate of the source entropy
    reference = json.loads((ladder / "flm" / "eval" / "samples.json").read_text())["reference"]
    per_token = np.array([rec["judge_nll_sum"] / length for rec in reference])
    stderr = per_token.std(ddof=1) / math.sqrt(len(per_token))
    assert abs(per_token.mean() - table["source_entropy_per_token"]) < 5 * stderr
    assert table["rows"][-1]["oracle_nll_per_token"] == pytest.approx(per_token.mean(),
                                                                       rel=1e-9)


def test_infinite_nll_rows_carry_their_reason(tmp_path):
    driver = load_driver()
    inf_row = {"steps": 1, "oracle_nll_per_token": math.inf, "oracle_gen_ppl": math.inf,
               "entropy_gap": math.inf, "entropy_mean": 1.0, "network_calls_per_sample": 1,
               "oracle_impossible_fraction": 0.25, "oracle_nll_per_token_possible": 2.0,
               "source_entropy_per_token": 1.5, "source_entropy_rate": 1.4}
    summary = {"num_samples": 4, "seed": 1, "rows": [inf_row],
               "reference": {**inf_row, "oracle_nll_per_token": 1.5, "oracle_gen_ppl": 4.48,
                             "entropy_gap": 0.0, "oracle_impossible_fraction": 0.0}}
    ladder = driver.models(driver.PRESETS["quick"], 16, ["flm"])
    summaries = {m.run: summary for m in ladder}
    result = driver.write_outputs(tmp_path, summaries, {"num_samples": 4, "seed": 1}, ladder)
    note = result["rows"][0]["note"]
    assert "25.0% of samples impossible" in note and "2.000" in note
    stored = json.loads((tmp_path / "table.json").read_text())  # strict JSON: inf -> null
    assert stored["rows"][0]["oracle_nll_per_token"] is None
    assert "| inf |" in (tmp_path / "table.md").read_text()


def test_nonempty_out_is_refused(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        load_driver().main(["--out", str(tmp_path), "--quick"])


@pytest.mark.parametrize("size", ["gpu", "cpu"])
def test_presets_compose_for_every_stage(tmp_path, size):
    """Every stage of a preset is a valid Hydra composition (no unknown key or group), the
    exact-denoiser row samples without a checkpoint, and baselines appear only when
    algo.ALGORITHMS has them."""
    driver = load_driver()
    preset = driver.PRESETS[size]
    ladder = driver.models(preset, 32, ["flm", "flm_distill", "flm_distill_second", "mdlm"])
    labels = [m.label for m in ladder]
    assert "exact denoiser" in labels and "FMLM (exact teacher)" in labels
    assert ("MDLM" in labels) == ("mdlm" in preset.baselines) and "AR" not in labels
    shared = ["trainer.accelerator=cpu", *preset.overrides]
    commands = driver.stage_commands(tmp_path, preset, preset.flm_steps, preset.distill_steps,
                                     shared, ladder)
    assert len(commands) == 2 * len(ladder) - 1  # the exact denoiser is not trained
    for name, overrides in commands:
        if name == "sample_eval oracle":
            assert "eval.denoiser=oracle" in overrides
            assert not any(o.startswith("eval.checkpoint_path") for o in overrides)
        algo_name = next(o for o in overrides if o.startswith("algo=")).split("=")[1]
        if not (ROOT / "configs" / "algo" / f"{algo_name}.yaml").is_file():
            continue  # a baseline of another branch: its row logic is checked above
        config = compose_config([o for o in overrides if not o.startswith("hydra.")])
        assert config.data.name == "synthetic"
        if size == "gpu" and name.startswith("train"):  # the preset's overrides reach it
            blocks = next(int(o.split("=")[1]) for o in preset.overrides
                          if o.startswith("model.n_blocks="))
            assert config.trainer.precision == "bf16" and config.model.n_blocks == blocks
