"""The CLI end to end (train, resume, sample_eval, ppl_eval) and config checks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import MissingConfigException

from algo import resolve_config
from runtime.config import ConfigError
from tests.helpers import CONFIG_DIR, TINY_MODEL, compose_config

ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_MODEL, "loader.global_batch_size=8", "trainer.limit_val_batches=2",
        "trainer.val_check_interval=4", "lr_scheduler.num_warmup_steps=2",
        "trainer.enable_progress_bar=false", "sampling.steps=[4]", "sampling.print_samples=2"]


def run_main(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # offline, wandb disabled: the session's environment (tests/conftest.py)
    proc = subprocess.run([sys.executable, "-m", "main", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    return proc


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["algo", "model", "data", "strategy", "lr_scheduler"])
def test_every_config_option_composes(group):
    options = group_options(group)
    assert options
    for option in options:
        config = compose_config([f"{group}={option}"])
        assert config[group] is not None
        if group == "algo":  # distillation algos need teacher files: checked in resolve_config
            continue
        resolve_config(config)


def test_bad_overrides_fail_clearly():
    with pytest.raises(MissingConfigException, match="algo"):
        compose_config(["algo=no_such_algo"])
    with pytest.raises(ConfigError, match="loader.global_batch_size"):
        resolve_config(compose_config(["loader.global_batch_size=30", "loader.batch_size=8"]))
    with pytest.raises(ConfigError, match="model.n_heads"):
        resolve_config(compose_config(["model.hidden_size=100", "model.n_heads=3"]))
    with pytest.raises(ConfigError, match="sampling.steps"):
        resolve_config(compose_config(["sampling.steps=[0]"]))
    with pytest.raises(ConfigError, match="training.input_path"):
        resolve_config(compose_config(["training.input_path=onehot"]))
    with pytest.raises(ConfigError, match="mode"):
        resolve_config(compose_config(["mode=serve"]))
    with pytest.raises(ConfigError, match="trainer.profiler='pytorch'"):
        resolve_config(compose_config(["trainer.profiler=pytorch"]))


def test_gradient_accumulation_is_derived_from_the_global_batch():
    config = resolve_config(compose_config(["loader.global_batch_size=64",
                                            "loader.batch_size=16"]))
    assert config.trainer.accumulate_grad_batches == 4
    config = resolve_config(compose_config(["loader.global_batch_size=64"]))
    assert config.loader.batch_size == 64 and config.trainer.accumulate_grad_batches == 1


def test_loader_workers_auto_follow_the_accelerator():
    cpu = resolve_config(compose_config(["trainer.accelerator=cpu"]))
    assert (cpu.loader.num_workers, cpu.loader.pin_memory) == (0, False)
    # resolution only reads the accelerator named: no GPU is needed to check the CUDA choice
    gpu = resolve_config(compose_config(["trainer.accelerator=gpu", "trainer.devices=1"]))
    assert (gpu.loader.num_workers, gpu.loader.pin_memory) == (4, True)
    given = resolve_config(compose_config(["trainer.accelerator=gpu", "trainer.devices=1",
                                           "loader.num_workers=2", "loader.pin_memory=false"]))
    assert (given.loader.num_workers, given.loader.pin_memory) == (2, False)
    for bad in ("loader.num_workers=-1", "loader.num_workers=many", "loader.pin_memory=maybe"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            resolve_config(compose_config(["trainer.accelerator=cpu", bad]))


def tiny_judge(directory: Path) -> Path:
    """A small GPT-2 with the embedded tokenizer, saved like scripts/train_judge.py does."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import data
    config = compose_config([])
    tokenizer = data.get_tokenizer(config)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32,
                                       n_layer=1, n_head=2,
                                       bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_train_resume_sample_eval_ppl_eval(tmp_path):
    run = tmp_path / "run"
    first = run_main(TINY + ["trainer.max_steps=6", f"hydra.run.dir={run}"])
    assert first.returncode == 0, first.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and (run / "config_resolved.yaml").is_file()
    assert "sample 0 (4 steps)" in first.stderr + first.stdout
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6 and "ema" in ckpt

    # the resumed leg also asks for Lightning's host-time profile: its report is printed
    second = run_main(TINY + ["trainer.max_steps=10", f"hydra.run.dir={run}",
                              "trainer.profiler=simple"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr + second.stdout
    assert "Profiler Report" in second.stderr + second.stdout
    assert "Profiler Report" not in first.stderr + first.stdout
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 10
    # the loss curves (curves.png) hold the validations of both legs: step 4's came from the
    # first leg's checkpoint
    curves = next(v for k, v in resumed["callbacks"].items() if k.startswith("TrainingReport"))
    assert [step for step, _ in curves["val"]] == [4, 8]
    # the EMA kept moving from the saved one rather than restarting from the weights
    name = "blocks.0.qkv.weight"
    assert not torch.equal(resumed["ema"]["shadow"][name], ckpt["ema"]["shadow"][name])

    judge = tiny_judge(tmp_path / "judge")
    out = tmp_path / "eval"
    ev = run_main(TINY + ["mode=sample_eval", f"eval.checkpoint_path={last}",
                          f"eval.gen_ppl_eval_model_name_or_path={judge}",
                          "sampling.steps=[1,2]", "eval.num_samples=4",
                          "sampling.batch_size=2", "eval.compute_mauve=false",
                          f"eval.output_dir={out}", f"hydra.run.dir={tmp_path / 'evalrun'}"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    text = json.dumps(summary)
    assert "reference" in text
    assert (out / "eval_plot.png").stat().st_size > 1000
    samples = json.loads((out / "samples.json").read_text())
    assert samples  # per step count: texts, ids, NLL, entropy

    ppl = run_main(TINY + ["mode=ppl_eval", f"eval.checkpoint_path={last}",
                           f"hydra.run.dir={tmp_path / 'pplrun'}"])
    assert ppl.returncode == 0, ppl.stderr[-3000:]
    assert "val/loss" in ppl.stderr + ppl.stdout

    # data other than the checkpoint's: one error (checkpoint_config.py) before any loading
    other = run_main(TINY + ["mode=ppl_eval", f"eval.checkpoint_path={last}", "data=synthetic",
                             f"hydra.run.dir={tmp_path / 'otherrun'}"])
    assert other.returncode == 2
    assert "data=synthetic contradicts" in other.stderr and "data.name=embedded" in other.stderr


def test_missing_checkpoint_for_eval_is_a_clear_error(tmp_path):
    proc = run_main(TINY + ["mode=ppl_eval", f"eval.checkpoint_path={tmp_path / 'nope.ckpt'}",
                            f"hydra.run.dir={tmp_path}"])
    assert proc.returncode != 0
    assert f"eval.checkpoint_path={tmp_path / 'nope.ckpt'}: no such file" in proc.stderr
