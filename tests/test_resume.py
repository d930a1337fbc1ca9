"""Exact resume: a run stopped by a signal and resumed equals the uninterrupted run; corrupt
checkpoints give one clear error and never damage the previous one."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runtime import checkpointing, reliability
from runtime.checkpointing import AtomicCheckpointIO, check_compatible, find_resume_checkpoint
from tests.helpers import TINY_MODEL, compose_config

REPO = Path(__file__).resolve().parents[1]
# a tiny model over the embedded corpus; dropout on, so the resume must restore RNG states
TINY = ["model=tiny", *TINY_MODEL, "model.dropout=0.1", "loader.global_batch_size=8",
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


def start_main(save_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(main_command(save_dir, "trainer.max_steps=100000", *overrides),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def wait_for(proc: subprocess.Popen, target: Path) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not target.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"run ended or stalled before {target}:\n{proc.stdout.read()}")
        time.sleep(0.05)


def run_until_signal(save_dir: Path, sig: signal.Signals, after_file: str,
                     env: dict | None = None, *overrides: str,
                     ) -> tuple[subprocess.CompletedProcess, str]:
    """Start a long run, send ``sig`` (to rank 0) once ``after_file`` (relative to the checkpoint
    dir) exists, and wait for the process to exit."""
    proc = start_main(save_dir, *overrides, env=env)
    wait_for(proc, save_dir / "checkpoints" / after_file)
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
    proc = start_main(interrupted)
    wait_for(proc, interrupted / "checkpoints" / "step00000002.ckpt")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == reliability.EXIT_PREEMPTED, output[-4000:]
    assert "received SIGTERM" in output and "stopped by SIGTERM" in output
    stopped = load(interrupted / "checkpoints" / "last.ckpt")
    k = stopped["global_step"]
    assert k >= 2
    n = k + 3  # crosses a validation (every 3 steps): validation must not shift the RNG streams
    resumed = run_main(interrupted, f"trainer.max_steps={n}")
    assert "resuming from" in (resumed.stdout + resumed.stderr)
    # Lightning's false "dataloader is not resumable" warning is silenced
    assert "not resumable" not in (resumed.stdout + resumed.stderr)
    run_main(straight, f"trainer.max_steps={n}")
    assert_same_state(load(interrupted / "checkpoints" / "last.ckpt"),
                      load(straight / "checkpoints" / "last.ckpt"))


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_130_and_a_second_run_is_refused(tmp_path):
    proc = start_main(tmp_path)
    wait_for(proc, tmp_path / "checkpoints" / "step00000002.ckpt")
    second = run_main(tmp_path, "trainer.max_steps=100000", check=False)  # same directory
    assert second.returncode != 0
    assert f"is in use by another run (host {socket.gethostname()}, pid {proc.pid})" in \
        (second.stdout + second.stderr)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == reliability.EXIT_INTERRUPTED, output[-4000:]
    assert "received SIGINT" in output
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] >= 2
    assert not (tmp_path / ".lock").exists()


@pytest.mark.slow
def test_resume_config_changes_are_refused_or_applied_and_recorded(tmp_path):
    run_main(tmp_path, "trainer.max_steps=2")
    resolved = (tmp_path / "config_resolved.yaml").read_text()
    first = load(tmp_path / "checkpoints" / "last.ckpt")
    refused = run_main(tmp_path, "trainer.max_steps=4", "optim.lr=1e-3", "training.ema=0.5",
                       check=False)
    assert refused.returncode != 0
    assert "optim.lr: 0.0003 -> 0.001" in (refused.stdout + refused.stderr)
    assert "training.ema: 0.9 -> 0.5" in (refused.stdout + refused.stderr)
    assert (tmp_path / "config_resolved.yaml").read_text() == resolved  # not overwritten
    finished = run_main(tmp_path, "trainer.max_steps=2", check=False)
    assert finished.returncode != 0
    assert "at step 2: there is nothing to train" in (finished.stdout + finished.stderr)
    run_main(tmp_path, "trainer.max_steps=4", "optim.lr=1e-3", "training.ema=0.5",
             "resume.allow_changes=[optim.lr,training.ema]")
    after = load(tmp_path / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 4 and after["run_id"] == first["run_id"]
    assert after["ema"]["decay"] == 0.5
    assert after["lr_schedulers"][0]["base_lrs"] == [1e-3]
    assert after["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    assert after["hyper_parameters"]["config"]["optim"]["lr"] == 1e-3
    history = [json.loads(line) for line in
               (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 2]
    assert history[1]["changes"]["optim.lr"] == [3e-4, 1e-3]
    assert history[1]["run_id"] == first["run_id"]


def _fake_ckpt(path: Path, step: int) -> None:
    torch.save({"global_step": step, "run_id": "run-a"}, path)


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
    checkpointing.write_run_id(ckpts, "run-a")
    path, ckpt = find_resume_checkpoint(last, fallback_to_previous=True)
    assert path == ckpts / "step00000004.ckpt" and ckpt["global_step"] == 4  # newest readable
    assert "resuming from" in caplog.text and "step00000004.ckpt" in caplog.text


def test_atomic_write_keeps_previous_file_on_crash(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO(background=False)
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
