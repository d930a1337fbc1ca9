"""Paper presets (configs/experiment/*.yaml) and the scripts that select them.

Scripts run with a stand-in ``python`` on PATH (scripts/slurm/render.py's) that prints the
command instead of running it; presets are composed with Hydra as ``main`` composes them.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scripts.slurm.render import write_stand_in_python
from tests.helpers import compose_config

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"owt": ("openwebtext", 1024), "lm1b": ("lm1b", 128)}
ALGOS = ("flm", "flm_distill", "flm_distill_second")
RUNS = [f"{d}_{a}" for d in DATASETS for a in ALGOS]

# Transcribed from the paper's scripts (david3684/flm scripts/train_<run>.sh): global batch,
# per-device batch, max steps, validation interval, sampling steps, boundary_prob (None: unset).
UPSTREAM_TRAIN = {
    "owt_flm": (512, 32, 1_500_000, 5000, [1024], None),
    "lm1b_flm": (512, 32, 1_500_000, 5000, [1024], None),
    "owt_flm_distill": (128, 16, 1_000_000, 10000, [1, 2, 4, 32], 64),
    "lm1b_flm_distill": (512, 128, 1_000_000, 10000, [1, 2, 4, 32], 64),
    "owt_flm_distill_second": (512, 128, 1_000_000, 5000, [1, 2, 4, 32], 128),
    "lm1b_flm_distill_second": (512, 128, 1_000_000, 5000, [1, 2, 4, 32], 128),
}
# scripts/gen_ppl_<run>.sh upstream (stage 2 is gen_ppl_<data>_flm_distill_double.sh):
# STEPS, eval_batch_size x num_sample_batches
UPSTREAM_GEN = {"flm": ([512], 1), "flm_distill": ([32], 8), "flm_distill_second": ([32], 1)}


def run_script(script: str, args: list[str], tmp_path: Path, **env: str) -> list[str]:
    """The python command ``bash scripts/<script> args`` runs, from another directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_stand_in_python(bin_dir)
    full_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env}
    result = subprocess.run(["bash", str(REPO / "scripts" / script), *args], cwd=tmp_path,
                            env=full_env, capture_output=True, text=True, check=True)
    return shlex.split(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["train", "gen_ppl"])
@pytest.mark.parametrize("run", RUNS)
def test_script_is_exec_main_with_its_preset(tmp_path, kind, run):
    data, algo = run.split("_", 1)
    preset = run if kind == "train" else f"{data}_gen_ppl_{algo}"
    extra = ["trainer.max_steps=7", "eval.checkpoint_path='/a b/epoch=3-step=9.ckpt'"]
    command = run_script(f"{kind}_{run}.sh", extra, tmp_path)
    assert command == ["python", "-u", "-m", "main", f"+experiment={preset}", *extra]
    text = (REPO / "configs" / "experiment" / f"{preset}.yaml").read_text()
    assert text.startswith("# @package _global_\n")


@pytest.mark.parametrize("run", RUNS)
def test_train_preset_composes_with_upstream_settings(run):
    data, algo = run.split("_", 1)
    config = compose_config([f"+experiment={run}"])
    name, length = DATASETS[data]
    assert (config.data.name, config.algo.name, config.model.length) == (name, algo, length)
    assert config.model.name == "small" and config.trainer.precision == "bf16"
    global_batch, batch, max_steps, val_interval, steps, boundary = UPSTREAM_TRAIN[run]
    assert config.loader.global_batch_size == global_batch
    assert config.loader.batch_size == config.loader.eval_batch_size == batch
    assert config.trainer.max_steps == max_steps
    assert config.trainer.val_check_interval == val_interval
    assert list(config.sampling.steps) == steps
    assert config.algo.get("boundary_prob") == boundary
    assert config.algo.double_temb == (algo != "flm")
    assert config.callbacks.checkpoint_every_n_steps.every_n_train_steps == 20000
    assert config.optim.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("run", RUNS)
def test_gen_ppl_preset_is_the_paper_protocol_without_model_length(run):
    data, algo = run.split("_", 1)
    preset = f"{data}_gen_ppl_{algo}"
    raw = yaml.safe_load((REPO / "configs" / "experiment" / f"{preset}.yaml").read_text())
    assert "model" not in raw  # model.length comes from the checkpoint
    config = compose_config([f"+experiment={preset}"])
    assert config.mode == "sample_eval" and config.eval.protocol == "paper"
    assert config.data.name == DATASETS[data][0] and config.algo.name == algo
    steps, num_samples = UPSTREAM_GEN[algo]
    assert list(config.sampling.steps) == steps and config.eval.num_samples == num_samples
    assert config.seed == 1 and config.sampling.batch_size == 1
    assert not config.eval.compute_mauve and not config.eval.reference_row


def test_env_aliases_are_read_by_the_configs(monkeypatch):
    path = "/data/x=1/epoch=3-step=9.ckpt"  # '=' needs quoting on a Hydra command line
    monkeypatch.setenv("DATA_DIR", "/data/cache dir")
    monkeypatch.setenv("CKPT_PATH", path)
    monkeypatch.setenv("TEACHER_F_PATH", path + ".f")
    monkeypatch.setenv("TEACHER_G_PATH", path + ".g")
    config = compose_config(["+experiment=owt_gen_ppl_flm_distill_second"])
    assert config.data.cache_dir == "/data/cache dir"
    assert config.eval.checkpoint_path == path
    assert (config.algo.teacher_f_path, config.algo.teacher_g_path) == (path + ".f", path + ".g")
    monkeypatch.delenv("CKPT_PATH")
    assert compose_config(["+experiment=owt_gen_ppl_flm"]).eval.checkpoint_path is None


@pytest.mark.parametrize("run", RUNS)
def test_sweep_script_composes(tmp_path, run):
    command = run_script("gen_ppl_sweep.sh", [run, "eval.protocol=clean"], tmp_path)
    assert command[:4] == ["python", "-u", "-m", "main"]
    overrides = command[4:]
    data, algo = run.split("_", 1)
    assert overrides[0] == f"+experiment={data}_gen_ppl_{algo}"
    config = compose_config(overrides)
    assert config.eval.num_samples == 1000 and config.eval.compute_mauve
    assert config.eval.protocol == "clean" and config.sampling.steps[0] == 1


def test_sweep_script_rejects_an_unknown_run(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as error:
        run_script("gen_ppl_sweep.sh", ["owt_mdlm"], tmp_path)
    assert "owt_mdlm" in error.value.stderr


def _reproduce(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(REPO / "scripts" / "reproduce_paper.sh"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True)


def test_reproduce_paper_dry_run_commands_compose(tmp_path):
    result = _reproduce(tmp_path, "--dry-run", "--out", str(tmp_path / "o"), "--num-samples",
                        "32", "--", "eval.judge_dtype=float32")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    fetches = [line for line in lines if line.startswith("fetch:")]
    evals = [line for line in lines if line.startswith("eval:")]
    assert len(fetches) == len(evals) == 4
    expected = {"owt_flm": ("gen_ppl_owt_flm.sh", [1024]),
                "owt_fmlm": ("gen_ppl_owt_flm_distill_second.sh", [1, 4]),
                "lm1b_flm": ("gen_ppl_lm1b_flm.sh", [1024]),
                "lm1b_fmlm": ("gen_ppl_lm1b_flm_distill_second.sh", [1])}
    for (run, (script, steps)), fetch, line in zip(expected.items(), fetches, evals):
        assert f"{run}.ckpt" in fetch
        words = shlex.split(line.removeprefix("eval: "))
        assert words[0] == f"CKPT_PATH=<{run}.ckpt>" and words[1:3] == ["bash",
                                                                         f"scripts/{script}"]
        assert words[-1] == "eval.judge_dtype=float32"
        # the python command the script would run, composed as main composes it
        command = run_script(script, words[3:], tmp_path)
        config = compose_config([w for w in command[4:] if not w.startswith("hydra.")])
        assert config.eval.protocol == "paper" and list(config.sampling.steps) == steps
        assert config.eval.num_samples == 32
        assert config.eval.output_dir == str(tmp_path / "o" / run / "eval")


def test_reproduce_paper_compare_prints_ours_next_to_the_paper(tmp_path):
    out = tmp_path / "o"
    ours = {"owt_fmlm": [(1, 170.5, 5.11), (4, 110.25, 5.3)], "lm1b_flm": [(1024, 97.5, 4.3)]}
    for run, rows in ours.items():
        (out / run / "eval").mkdir(parents=True)
        summary = {"protocol": "paper", "rows": [
            {"steps": s, "gen_ppl": p, "entropy_mean": e, "num_samples": 32} for s, p, e in rows]}
        (out / run / "eval" / "summary.json").write_text(json.dumps(summary))
    result = _reproduce(tmp_path, "--compare-only", "--out", str(out), "--runs",
                        "owt_fmlm lm1b_flm lm1b_fmlm")
    assert result.returncode == 0, result.stderr
    table = {tuple(line.split()[:2]): line.split() for line in result.stdout.splitlines()[1:]}
    assert table[("owt_fmlm", "1")][4:] == ["|", "170.50", "168.30", "|", "5.11", "5.17"]
    assert table[("owt_fmlm", "4")][4:] == ["|", "110.25", "111.31", "|", "5.30", "5.26"]
    assert table[("lm1b_flm", "1024")][2:4] == ["paper", "32"]
    assert table[("lm1b_flm", "1024")][5:7] == ["97.50", "96.91"]
    assert table[("lm1b_fmlm", "missing:")]  # no summary: named, not skipped


def test_reproduce_paper_rejects_an_unknown_run(tmp_path):
    result = _reproduce(tmp_path, "--dry-run", "--runs", "owt_mdlm")
    assert result.returncode == 2 and "owt_mdlm" in result.stderr
