"""Exact resume: a run stopped by a signal and resumed equals the uninterrupted run; corrupt
checkpoints give one clear error and never damage the previous one."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpointing
from checkpointing import AtomicCheckpointIO, check_compatible, find_resume_checkpoint
from tests.helpers import compose_config

REPO = Path(__file__).resolve().parents[1]
# a tiny model over the embedded corpus; dropout on, so the resume must restore RNG states
TINY = ["model=tiny", "model.length=32", "model.hidden_size=32", "model.n_heads=2",
        "model.n_blocks=1", "model.cond_dim=16", "model.dropout=0.1", "loader.global_batch_size=8",
        "loader.batch_size=4", "trainer.accelerator=cpu", "trainer.limit_val_batches=2",
        "trainer.val_check_interval=3", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "sampling.print_samples=0", "training.ema=0.9",
        "lr_scheduler.num_warmup_steps=2", "callbacks.checkpoint_every_n_steps.every_n_train_steps=2",
        "callbacks.checkpoint_last.every_n_train_steps=1000"]
RUN_TIMEOUT_S = 240


def main_command(save_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-u", "-m", "main", *TINY, f"checkpointing.save_dir={save_dir}",
            f"hydra.run.dir={save_dir}", *overrides]


def run_main(save_dir: Path, *overrides: str, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(main_command(save_dir, *overrides), cwd=REPO, capture_output=True,
                            text=True, timeout=RUN_TIMEOUT_S, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"main failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def run_until_signal(save_dir: Path, sig: signal.Signals, after_file: str,
                     env: dict | None = None, *overrides: str,
                     ) -> tuple[subprocess.CompletedProcess, str]:
    """Start a long run, send ``sig`` (to rank 0) once ``after_file`` (relative to the checkpoint
    dir) exists, and wait for a clean exit."""
    proc = subprocess.Popen(main_command(save_dir, "trainer.max_steps=100000", *overrides),
                            cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    target = save_dir / "checkpoints" / after_file
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not target.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"run ended or stalled before {target}:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, ""), output


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for key in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][key], b["ema"]["shadow"][key]), key
    for (ka, sa), (kb, sb) in zip(a["optimizer_states"][0]["state"].items(),
                                  b["optimizer_states"][0]["state"].items()):
        assert ka == kb and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["FLMDataModule"] == b["FLMDataModule"]  # sampler position


@pytest.mark.slow
def test_sigterm_stop_and_resume_equals_uninterrupted(tmp_path):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    result, output = run_until_signal(interrupted, signal.SIGTERM, "step00000002.ckpt")
    assert result.returncode == 0, output[-4000:]
    assert "received SIGTERM" in output and "stopped by SIGTERM" in output
    stopped = load(interrupted / "checkpoints" / "last.ckpt")
    k = stopped["global_step"]
    assert k >= 2
    n = k + 3  # crosses a validation (every 3 steps): validation must not shift the RNG streams
    resumed = run_main(interrupted, f"trainer.max_steps={n}")
    assert "resuming from" in resumed.stderr
    run_main(straight, f"trainer.max_steps={n}")
    assert_same_state(load(interrupted / "checkpoints" / "last.ckpt"),
                      load(straight / "checkpoints" / "last.ckpt"))


def _fake_ckpt(path: Path, step: int) -> None:
    torch.save({"global_step": step}, path)


def test_find_resume_checkpoint(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    last = ckpts / "last.ckpt"
    assert find_resume_checkpoint(last, fallback_to_previous=False) == (None, None)
    for step in (2, 4, 6):
        _fake_ckpt(ckpts / f"step{step:08d}.ckpt", step)
    with pytest.raises(FileNotFoundError, match="fallback_to_previous"):
        find_resume_checkpoint(last, fallback_to_previous=False)
    _fake_ckpt(last, 7)
    path, ckpt = find_resume_checkpoint(last, fallback_to_previous=False)
    assert path == last and ckpt["global_step"] == 7
    last.write_bytes(last.read_bytes()[:20])  # truncated
    (ckpts / "step00000006.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=f"{last} is corrupt or truncated"):
        find_resume_checkpoint(last, fallback_to_previous=False)
    path, ckpt = find_resume_checkpoint(last, fallback_to_previous=True)
    assert path == ckpts / "step00000004.ckpt" and ckpt["global_step"] == 4  # newest readable
    assert "resuming from" in caplog.text and "step00000004.ckpt" in caplog.text


def test_atomic_write_keeps_previous_file_on_crash(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)

    def crash(obj, f):  # half a file, then the process "dies"
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert load(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_check_compatible_rejects_other_vocab_length_and_algo():
    config = compose_config(["model.length=32"])
    ckpt = {"hyper_parameters": {"vocab_size": 100, "config": {
        "model": {"length": 32, "hidden_size": config.model.hidden_size}, "algo": {"name": "flm"}}}}
    check_compatible(ckpt, config, 100, "x.ckpt")
    with pytest.raises(ValueError, match="100 tokens but the data's tokenizer .* has 50"):
        check_compatible(ckpt, config, 50, "x.ckpt")
    ckpt["hyper_parameters"]["config"]["model"]["length"] = 16
    with pytest.raises(ValueError, match="model.length=16 but the config has model.length=32"):
        check_compatible(ckpt, config, 100, "x.ckpt")
    ckpt["hyper_parameters"]["config"]["model"]["length"] = 32
    ckpt["hyper_parameters"]["config"]["algo"]["name"] = "fmlm"
    with pytest.raises(ValueError, match="algo=fmlm"):
        check_compatible(ckpt, config, 100, "x.ckpt")
