"""A researcher's first hour (issue 33): evaluation from a checkpoint alone, one-line user
errors, a quick offline message, what a run logs and draws, ppl_eval's report, generation's
seed / infill / output, and a quiet log. End to end through ``python -m main`` where the
behaviour is the command line's; checkpoints are built directly (no training) where only their
contents matter."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
from algo import resolve_config
from evaluation import checkpoint_config
from runtime.config import ConfigError
from tests.helpers import TINY_MODEL, compose_config

ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_MODEL, "loader.global_batch_size=4", "trainer.enable_progress_bar=false",
        "lr_scheduler.num_warmup_steps=1", "sampling.print_samples=0"]
OFFLINE_BOUND_S = 15.0  # issue 33: offline is said within 15 s


def run(args: list[str], cwd: Path = ROOT, env: dict | None = None,
        script: str | None = None) -> subprocess.CompletedProcess:
    """``python -m main`` (or ``script``) with ``args``, from ``cwd`` with the repo importable."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    command = [sys.executable, script] if script else [sys.executable, "-m", "main"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={k: v for k, v in environment.items() if v is not None})


def build_checkpoint(path: Path, overrides: list[str], step: int) -> Path:
    """A checkpoint as training writes it (state dict, EMA, saved config, step), of an
    untrained module: evaluation reads nothing else."""
    import main
    config = resolve_config(compose_config(TINY + overrides, run_dir=str(path.parent)))
    tokenizer = data.get_tokenizer(config)
    module = main.build_module(config, tokenizer)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "global_step": step}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {"mdlm": build_checkpoint(root / "mdlm.ckpt", ["algo=mdlm"], step=7),
            "ar": build_checkpoint(root / "ar.ckpt", ["algo=ar"], step=5),
            "flm": build_checkpoint(root / "flm.ckpt", ["algo=flm"], step=3)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny FLM training run: 4 steps, validation and last.ckpt every 2, a log line every 2."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    launched = time.time()
    proc = run([*TINY, "trainer.max_steps=4", "trainer.val_check_interval=2",
                "trainer.limit_val_batches=1", "trainer.log_every_n_steps=2",
                "callbacks.checkpoint_last.every_n_train_steps=2",
                "callbacks.checkpoint_every_n_steps.every_n_train_steps=100",
                f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir / "wall_s").write_text(f"{time.time() - launched}")  # launch to exit, this side
    return run_dir, proc.stdout + proc.stderr


# ---------------------------------------------------------------- 2: the checkpoint's config


def test_generate_takes_algo_data_and_run_dir_from_the_checkpoint(checkpoints, tmp_path):
    """MDLM checkpoint, nothing else given: the log and the run directory say mdlm (the
    default algo is flm); stdout is the JSON; MDLM's own sampler ran (unconditional)."""
    proc = run(["mode=generate", f"eval.checkpoint_path={checkpoints['mdlm']}",
                "sampling.steps=[2]", "generate.num_samples=2", "generate.format=json"],
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mode=generate algo=mdlm" in proc.stderr
    run_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert [p.relative_to(tmp_path / "outputs").as_posix() for p in run_dirs] == ["embedded/mdlm"]
    result = json.loads(proc.stdout)  # stdout holds the JSON alone
    assert result["settings"]["algo"] == "mdlm"
    assert len(result["samples"]) == 2
    # the seed was drawn for this run, and printed
    assert f"generate.seed={result['settings']['seed']} (drawn" in proc.stderr
    # an infill on MDLM (unconditional sampler) is one clear error, not FLM's sampler on its weights
    refused = run(["mode=generate", f"eval.checkpoint_path={checkpoints['mdlm']}",
                   "sampling.steps=[2]", "generate.infill='the [MASK:3] of'"], cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "samples unconditionally" in refused.stderr and "Traceback" not in refused.stderr


def test_infill_ends_where_its_template_ends(checkpoints, tmp_path):
    """FLM checkpoint: each infill sample has the template's length and its known tokens."""
    infill = "the [MASK:3] of"
    proc = run(["mode=generate", f"eval.checkpoint_path={checkpoints['flm']}",
                "sampling.steps=[2]", "generate.num_samples=2", "generate.format=json",
                f"generate.infill='{infill}'"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    tokenizer = data.get_tokenizer(compose_config([]))
    template = [tokenizer.bos_token_id, *tokenizer("the", add_special_tokens=False)["input_ids"],
                None, None, None, *tokenizer(" of", add_special_tokens=False)["input_ids"]]
    assert len(result["samples"]) == 2
    for sample in result["samples"]:
        assert len(sample["token_ids"]) == len(template)
        assert [t for t, k in zip(sample["token_ids"], template) if k is not None] == \
            [k for k in template if k is not None]


def test_a_command_line_value_that_contradicts_the_checkpoint_is_refused(checkpoints):
    for overrides in (["algo=flm"], ["model.hidden_size=64"], ["data=synthetic"]):
        config = compose_config(["mode=generate", f"eval.checkpoint_path={checkpoints['mdlm']}",
                                 *overrides])
        with pytest.raises(ConfigError, match=overrides[0].split("=")[0]):
            checkpoint_config.adopt_checkpoint_config(config, overrides)
    # the same values as the checkpoint's, and this machine's paths, are accepted
    same = ["algo=mdlm", "model.hidden_size=32", "data.cache_dir=/elsewhere"]
    config = compose_config(["mode=ppl_eval", f"eval.checkpoint_path={checkpoints['mdlm']}",
                             *same])
    adopted = checkpoint_config.adopt_checkpoint_config(config, same)
    assert adopted.algo.name == "mdlm" and adopted.data.cache_dir == "/elsewhere"
    assert adopted.training.t_min == pytest.approx(1e-3)  # MDLM's, not FLM's 0
    # training runs are left alone
    config = compose_config([f"eval.checkpoint_path={checkpoints['mdlm']}"])
    assert checkpoint_config.adopt_checkpoint_config(config, []).algo.name == "flm"


# ---------------------------------------------------------------- 5: one line, exit 2


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_unparsable_value_is_one_line_exit_2(tmp_path):
    line = one_line_error(run([*TINY, "loader.global_batch_size=abc",
                               f"hydra.run.dir={tmp_path}"]))
    assert "loader.global_batch_size" in line


def test_unusable_compile_cache_is_one_line_exit_2(tmp_path):
    """A file where training.compile_cache needs a directory: one line naming the key."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = one_line_error(run([*TINY, f"training.compile_cache={blocker / 'cache'}",
                               f"hydra.run.dir={tmp_path / 'run'}"]))
    assert "training.compile_cache" in line


@pytest.mark.parametrize("override, names", [
    ("generate.prompt=To be, or", "is a sweep"),  # an unquoted comma: Hydra's sweep syntax
    ("model.length=(3", "Error parsing override"),  # not Hydra's override grammar
])
def test_override_hydra_cannot_take_is_one_line_exit_2(override, names, tmp_path):
    """Hydra would print its own multi-line message and exit 1; the line says how to quote."""
    line = one_line_error(run(["mode=generate", override, f"hydra.run.dir={tmp_path}"]))
    assert names in line and "quote" in line
    assert not (tmp_path / ".hydra").exists()  # refused before Hydra wrote anything


def test_corrupt_checkpoint_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    line = one_line_error(run(["mode=ppl_eval", f"eval.checkpoint_path={bad}",
                               f"hydra.run.dir={tmp_path / 'run'}"]))
    assert str(bad) in line


def test_contradiction_in_an_eval_mode_is_one_line_exit_2(checkpoints, tmp_path):
    line = one_line_error(run(["mode=ppl_eval", f"eval.checkpoint_path={checkpoints['ar']}",
                               "algo=mdlm", f"hydra.run.dir={tmp_path}"]))
    assert "algo=mdlm" in line and "algo.name=ar" in line


# ---------------------------------------------------------------- 6: offline, quickly


def test_offline_script_says_what_is_missing_quickly(tmp_path):
    """No offline variable set and no Hub access: prepare_data's tokenizer for OpenWebText
    (gpt2, not cached) is one line naming the key and the ways to provide it."""
    start = time.perf_counter()
    proc = run(["data=openwebtext-split", f"data.cache_dir={tmp_path / 'cache'}",
                f"hydra.run.dir={tmp_path / 'run'}"], script=str(ROOT / "scripts/prepare_data.py"),
               env={"HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None,
                    "TRANSFORMERS_OFFLINE": None, "HF_HOME": str(tmp_path / "hf"),
                    "HF_ENDPOINT": "https://hub.invalid"})
    elapsed = time.perf_counter() - start
    line = one_line_error(proc)
    for needle in ("data.tokenizer_name_or_path", "unreachable", "HF_HUB_OFFLINE", "HF_HOME"):
        assert needle in line, line
    assert elapsed < 4 * OFFLINE_BOUND_S  # includes the interpreter's start-up on a busy CPU


def test_offline_judge_and_data_fail_within_the_bound(tmp_path, monkeypatch):
    """In-process timings (no start-up): the judge and a Hub dataset, with the Hub unreachable
    and no offline variable, each end in one message within the bound."""
    from data import offline
    from evaluation.judges import load_judge
    for name in offline.OFFLINE_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(ConfigError) as judge_error:
        load_judge("gpt2-large")
    assert time.perf_counter() - start < OFFLINE_BOUND_S
    message = str(judge_error.value)
    for needle in ("eval.gen_ppl_eval_model_name_or_path", "unreachable", "train_judge.py",
                   "HF_HUB_OFFLINE"):
        assert needle in message, message
    config = compose_config(["data=lm1b-wrap", f"data.cache_dir={tmp_path / 'cache'}",
                             "data.tokenizer_name_or_path=assets/embedded_tokenizer.json",
                             "data.wrap_bos_token=null", "data.wrap_eos_token=null",
                             *TINY_MODEL])
    start = time.perf_counter()
    with pytest.raises(ConfigError) as data_error:
        data.get_datasets(config, data.get_tokenizer(compose_config([])))
    assert time.perf_counter() - start < OFFLINE_BOUND_S
    assert "unreachable" in str(data_error.value) and "HF_DATASETS_OFFLINE" in str(
        data_error.value)


# ---------------------------------------------------------------- 7, 8, 11: what training says


def test_training_logs_steps_draws_curves_and_stays_quiet(trained):
    run_dir, log = trained
    for step in (2, 4):
        line = next((ln for ln in log.splitlines() if f"step {step}/4  loss" in ln), None)
        assert line is not None, log[-3000:]
        assert "tokens/s" in line and "ETA" in line
    curves = run_dir / "curves.png"
    assert curves.is_file() and curves.read_bytes()[:4] == b"\x89PNG"
    assert str(curves) in log and str(run_dir) in log  # where the outputs went
    # last.ckpt: once at step 2 (periodic), once at the end (step 4), not twice there
    assert log.count(f"checkpoint written: {run_dir / 'checkpoints' / 'last.ckpt'}") == 2
    for noise in ("exists and is not empty", "Tip:", "GPU available", "is deprecated",
                  "weights_only"):
        assert noise not in log, noise


def test_training_says_when_the_first_step_ended(trained):
    """One line, at step 1: seconds since the process started (from /proc, counted by the
    process itself) above the seconds since training started (start-up takes seconds), and
    within the wall time this side measured from launch to exit."""
    run_dir, log = trained
    lines = [ln for ln in log.splitlines() if "first optimizer step" in ln]
    assert len(lines) == 1, log[-3000:]
    found = re.search(r"\(step 1\) done ([0-9.]+) s after the process started, ([0-9.]+) s "
                      r"after training started", lines[0])
    assert found, lines[0]
    since_process, since_training = float(found[1]), float(found[2])
    assert since_process > since_training >= 0
    wall = float((run_dir / "wall_s").read_text())
    assert since_process <= wall
    # at the end, once: the three steps after the first, timed after it ended (so within what
    # was left of the wall time), their rate consistent with the tokens a step holds
    steady = [ln for ln in log.splitlines() if "after the first step:" in ln]
    assert len(steady) == 1, log[-3000:]
    found = re.search(r"(\d+) optimizer steps? in ([0-9.]+) s \(([0-9.]+) ms per step, "
                      r"([0-9]+) tokens/s\)", steady[0])
    assert found, steady[0]
    steps, seconds, ms, rate = int(found[1]), float(found[2]), float(found[3]), int(found[4])
    assert steps == 3 and 0 < seconds <= wall - since_process
    assert ms == pytest.approx(1e3 * seconds / steps, abs=1e3 * 0.005 / steps + 0.05)  # rounding
    setting = dict(arg.split("=", 1) for arg in TINY if "=" in arg)
    tokens_per_step = int(setting["loader.global_batch_size"]) * int(setting["model.length"])
    assert rate == pytest.approx(tokens_per_step / (ms / 1e3), rel=0.05 / ms, abs=1)


def test_progress_bar_shows_steps_not_epochs():
    from runtime.monitoring import progress_bar, step_fraction_of
    bar = progress_bar(10)
    assert "Epoch" not in bar._get_train_description(0)
    assert step_fraction_of(120, 1000) == "120/1000"


@pytest.mark.parametrize("max_steps, global_step, accumulate, epoch_batches, total", [
    (1000, 0, 16, 50_000, 16_000),  # 16 micro-batches a step: 16,000 to go
    (1000, 990, 16, 50_000, 160),   # resumed near the end
    (1000, 0, 16, 100, 100),        # the epoch ends first
    (-1, 0, 4, 100, 100),           # no max_steps: the epoch
])
def test_progress_bar_total_counts_micro_batches(max_steps, global_step, accumulate,
                                                 epoch_batches, total):
    """The bar counts micro-batches; its total must too (Lightning's counts optimizer steps)."""
    from types import SimpleNamespace

    from runtime.monitoring import progress_bar
    bar = progress_bar(10)
    bar._trainer = SimpleNamespace(max_steps=max_steps, global_step=global_step,
                                   accumulate_grad_batches=accumulate, max_epochs=-1,
                                   num_training_batches=epoch_batches)
    assert bar.total_train_batches == total


# ---------------------------------------------------------------- 8: sample_eval's labels


def test_stand_in_judge_is_labelled_in_table_json_and_plot(tmp_path, monkeypatch):
    from evaluation import plots
    from evaluation.judges import STAND_IN_LABEL, load_judge
    from evaluation.sample_eval import run_sample_eval
    from tests.test_eval_judges import _load_train_judge_script, word_tokenizer
    tok_file = tmp_path / "tok.json"
    tokenizer = word_tokenizer()
    tokenizer.backend_tokenizer.save(str(tok_file))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(["the quiet king follows the green river ."] * 40))
    _load_train_judge_script().main(["--out", str(tmp_path / "judge"), "--text-file",
                                     str(corpus), "--tokenizer-file", str(tok_file),
                                     "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
                                     "--context", "16", "--steps", "2", "--batch-size", "4"])
    judge = load_judge(str(tmp_path / "judge"), retokenize=True, data_tokenizer=tokenizer)
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)

    def sample_fn(steps, n, seed):
        return torch.randint(4, vocab, (n, 8), generator=g)

    steps = [2, 8, 32]
    summary = run_sample_eval(sample_fn, lambda ids: tokenizer.batch_decode(ids.tolist()),
                              judge, None, None, steps, num_samples=2, seed=0,
                              out_dir=str(tmp_path / "eval"), model_name="tiny",
                              network_calls_per_step=1, compute_mauve=False, warmup=False)
    assert summary["judge_stand_in"] is True and STAND_IN_LABEL in summary["table"]
    saved = json.loads((tmp_path / "eval" / "samples.json").read_text())
    assert saved["judge_stand_in"] is True and STAND_IN_LABEL in saved["judge"]
    (figure,) = figures
    assert STAND_IN_LABEL in figure._suptitle.get_text()
    step_axis = figure.axes[0]
    assert [int(t) for t in step_axis.get_xticks()] == steps
    assert [t.get_text() for t in step_axis.get_xticklabels()] == [str(s) for s in steps]


# ---------------------------------------------------------------- 9, 10: ppl_eval, generate


def test_ppl_eval_reports_perplexity_step_and_coverage(checkpoints, tmp_path):
    run_dir = tmp_path / "ppl"
    proc = run(["mode=ppl_eval", f"eval.checkpoint_path={checkpoints['ar']}",
                "trainer.limit_val_batches=2", "loader.eval_global_batch_size=4",
                f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "eval" / "ppl.json").read_text())
    assert report["algo"] == "ar" and report["checkpoint_step"] == 5
    assert report["perplexity"] == pytest.approx(math.exp(report["val_loss"]), rel=1e-12)
    config = resolve_config(compose_config([*TINY, "algo=ar", "loader.eval_global_batch_size=4"]))
    _, valid = data.get_datasets(config, data.get_tokenizer(config))
    assert report["batches_scored"] == 2
    assert report["batches_total"] == math.ceil(len(valid) / 4)
    assert report["sequences_scored"] == 8 and report["tokens_scored"] == 8 * 32
    assert "perplexity" in proc.stderr and "step 5" in proc.stderr and "step 0" not in proc.stderr
    assert str(run_dir / "eval" / "ppl.json") in proc.stderr


def test_generate_text_separates_samples_and_draws_a_seed_per_run(checkpoints, tmp_path):
    seeds = []
    for k in range(2):
        out = tmp_path / f"g{k}.json"
        proc = run(["mode=generate", f"eval.checkpoint_path={checkpoints['flm']}",
                    "sampling.steps=[1]", "generate.num_samples=2", "generate.prompt=the",
                    f"generate.output_path={out}", f"hydra.run.dir={tmp_path / f'r{k}'}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(out.read_text())
        seeds.append(result["settings"]["seed"])
        headers = [ln for ln in proc.stdout.splitlines() if ln.startswith("===== sample ")]
        assert len(headers) == 2  # each sample under its own header line
        for sample in result["samples"]:
            assert sample["text"] in proc.stdout
    assert seeds[0] != seeds[1]  # two draws of 31 bits agree with probability 2^-31
