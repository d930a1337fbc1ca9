"""The step-count ladder (scripts/synthetic_table.sh --quick) end to end, and its table code.

The ladder's numbers are checked against independent computations: the oracle NLL of the
saved samples re-scored by a plain loop over the chain's transition matrix, the source
entropy by an eigenvector stationary law, and the held-out reference row by Monte Carlo.
"""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
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
    # two stages at a time: the scheduler of the GPU preset, on CI's two cores
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out), "--quick", "--jobs", "2"],
                          cwd=ROOT,
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
    seen = set()
    for stage in commands:  # the list is a valid sequential order
        assert set(stage.needs) <= seen, (stage.name, stage.needs)
        seen.add(stage.name)
    rank = driver.critical_order(commands)
    assert min(rank, key=rank.get) == "train flm"  # the longest chain starts first
    assert all(rank[need] < rank[st.name] for st in commands for need in st.needs)
    by_name = {st.name: st for st in commands}
    assert by_name["train fmlm"].needs == ("train flm", "train stage1")
    assert by_name["train fmlm_oracle"].needs == ("train stage1_oracle",)
    assert by_name["sample_eval oracle"].needs == ()
    for name, overrides in ((st.name, st.overrides) for st in commands):
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


# ---- the stage scheduler (--jobs), on stand-in stages --------------------------------------
FAKE_STAGE = """
import json, os, sys, time
name, folder, seconds, code = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
start = time.time()
with open(os.path.join(folder, name + ".pid"), "w") as f:
    f.write(str(os.getpid()))
time.sleep(seconds)
with open(os.path.join(folder, name + ".json"), "w") as f:
    json.dump({"start": start, "end": time.time()}, f)
print("stand-in stage", name, "exits with", code)
sys.exit(code)
"""


def fake_command(folder: Path, seconds: dict[str, float], codes: dict[str, int] | None = None):
    codes = codes or {}

    def command(stage) -> list[str]:
        return [sys.executable, "-c", FAKE_STAGE, stage.run, str(folder),
                str(seconds[stage.run]), str(codes.get(stage.run, 0))]
    return command


def test_stages_run_in_parallel_once_what_they_need_is_done(tmp_path):
    driver = load_driver()
    stages = [driver.Stage("train a", []), driver.Stage("train b", [], ("train a",)),
              driver.Stage("train c", []), driver.Stage("train d", [])]
    seconds = {"a": 1.0, "b": 0.3, "c": 1.0, "d": 1.0}
    finished = []
    driver.run_stages(stages, tmp_path, dict(os.environ), jobs=2, poll_seconds=0.05,
                      on_done=lambda st, seconds: finished.append(st.name),
                      command=fake_command(tmp_path, seconds))
    spans = {run: json.loads((tmp_path / f"{run}.json").read_text()) for run in seconds}
    assert spans["b"]["start"] >= spans["a"]["end"]  # b reads a's checkpoint
    assert finished.index("train a") < finished.index("train b")
    events = sorted([(s["start"], 1) for s in spans.values()] + [(s["end"], -1) for s in
                                                                  spans.values()])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak == 2  # two at a time, never three
    # a (the head of the longest chain) and c started together; d waited for a free slot
    assert abs(spans["a"]["start"] - spans["c"]["start"]) < 0.5
    assert spans["d"]["start"] >= min(spans["a"]["end"], spans["c"]["end"])
    for run in seconds:
        assert "stand-in stage" in (tmp_path / run / "train.log").read_text()


def test_a_failed_stage_stops_the_others_and_says_why(tmp_path):
    driver = load_driver()
    stages = [driver.Stage("train slow", []), driver.Stage("train bad", []),
              driver.Stage("train after", [], ("train bad",))]
    command = fake_command(tmp_path, {"slow": 60.0, "bad": 0.2, "after": 0.1}, {"bad": 3})
    start = time.perf_counter()
    with pytest.raises(SystemExit, match=r"stage 'train bad' failed \(exit 3\)(.|\n)*exits "
                                         r"with 3"):
        driver.run_stages(stages, tmp_path, dict(os.environ), jobs=2, poll_seconds=0.05,
                          command=command)
    assert time.perf_counter() - start < 30  # the 60 s stage was stopped, not waited for
    assert not process_alive(int((tmp_path / "slow.pid").read_text()))
    assert not (tmp_path / "after.pid").exists()  # never started


def test_sigterm_to_the_driver_stops_its_stages(tmp_path):
    script = f"""
import importlib.util, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from tests.test_synthetic_ladder import fake_command, load_driver
from pathlib import Path
driver = load_driver()
signal.signal(signal.SIGTERM, driver._terminated)
folder = Path({str(tmp_path)!r})
driver.run_stages([driver.Stage("train long", [])], folder, {{}}, jobs=1, poll_seconds=0.05,
                  command=fake_command(folder, {{"long": 120.0}}))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    pid_file = tmp_path / "long.pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    stage_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "stopped by signal 15" in output
    assert not process_alive(stage_pid)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as stopped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_partial_table_lists_what_is_evaluated_and_what_is_missing(tmp_path):
    driver = load_driver()
    row = {"steps": 4, "oracle_nll_per_token": 3.0, "oracle_gen_ppl": math.exp(3.0),
           "entropy_gap": 0.5, "entropy_mean": 2.0, "network_calls_per_sample": 4,
           "oracle_near_impossible_fraction": 0.01, "source_entropy_per_token": 2.5,
           "source_entropy_rate": 2.4}
    summary = {"num_samples": 8, "seed": 1, "rows": [row], "reference": dict(row, steps=None)}
    ladder = driver.models(driver.PRESETS["quick"], 16, ["flm"])
    done = {"oracle": summary, "stage1_oracle": summary}  # FLM itself not evaluated yet
    result = driver.write_outputs(tmp_path, done, {"num_samples": 8, "seed": 1}, ladder)
    assert [r["model"] for r in result["rows"]] == ["exact denoiser",
                                                    "stage-1 map (exact teacher)",
                                                    "source (held-out data)"]
    header = (tmp_path / "table.md").read_text().splitlines()[0]
    assert header.startswith("PARTIAL: 2 of 6 models evaluated so far")
    assert "missing: FLM, stage-1 map, FMLM, FMLM (exact teacher)" in header
    complete = driver.write_outputs(tmp_path, {m.run: summary for m in ladder},
                                    {"num_samples": 8, "seed": 1}, ladder)
    assert len(complete["rows"]) == len(ladder) + 1
    assert not (tmp_path / "table.md").read_text().startswith("PARTIAL")
