"""End-to-end stops of ``python -m main`` (tiny CPU runs): a preempted or interrupted run has
every logged step's values up to its checkpoint; a signal during start-up exits 75 and frees
the lock; a run refused by the lock leaves the live run's files alone."""

from __future__ import annotations

import csv
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from runtime import reliability
from tests.test_resume import RUN_TIMEOUT_S, load, run_main, start_main, wait_for

KEYS = ("train/loss", "train/grad_norm")


def logged_steps(save_dir: Path) -> dict[str, set[int]]:
    """The logger steps at which metrics.csv holds each of KEYS."""
    (path,) = save_dir.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(path.open()))
    return {key: {int(r["step"]) for r in rows if r.get(key)} for key in KEYS}


def stop(proc: subprocess.Popen, sig: signal.Signals) -> str:
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    return output


def assert_every_step_logged(save_dir: Path) -> None:
    """Step k of the checkpoint: the values of optimizer steps 1..k, which Lightning logs at
    logger steps 0..k-1 (trainer.log_every_n_steps=1)."""
    step = load(save_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert step >= 2
    for key, steps in logged_steps(save_dir).items():
        assert steps == set(range(step)), (key, sorted(steps), step)


@pytest.mark.slow
def test_sigterm_stop_logs_every_step_up_to_the_checkpoint(tmp_path):
    proc = start_main(tmp_path)
    wait_for(proc, tmp_path / "checkpoints" / "step00000002.ckpt")
    output = stop(proc, signal.SIGTERM)
    assert proc.returncode == reliability.EXIT_PREEMPTED, output[-4000:]
    assert_every_step_logged(tmp_path)


@pytest.mark.slow
def test_refused_run_writes_nothing_and_ctrl_c_logs_every_step(tmp_path):
    proc = start_main(tmp_path, "optim.lr=2e-4")
    wait_for(proc, tmp_path / "checkpoints" / "step00000002.ckpt")
    hydra_dir = tmp_path / ".hydra"
    before = {p.name: p.read_bytes() for p in hydra_dir.iterdir()}
    assert "optim.lr=2e-4" in before["overrides.yaml"].decode()
    top_level = {p.name for p in tmp_path.iterdir()}
    second = run_main(tmp_path, "trainer.max_steps=100000", "optim.lr=1e-2", check=False)
    assert second.returncode != 0
    assert f"is in use by another run (host {socket.gethostname()}, pid {proc.pid}) started" \
        in second.stdout + second.stderr
    assert {p.name: p.read_bytes() for p in hydra_dir.iterdir()} == before
    assert {p.name for p in tmp_path.iterdir()} == top_level
    assert (tmp_path / "main.log").read_text().count("mode=train") == 1  # the live run's
    output = stop(proc, signal.SIGINT)
    assert proc.returncode == reliability.EXIT_INTERRUPTED, output[-4000:]
    assert_every_step_logged(tmp_path)


@pytest.mark.slow
def test_sigterm_during_start_up_exits_75_and_releases_the_lock(tmp_path):
    proc = start_main(tmp_path)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (tmp_path / reliability.RunLock.NAME).exists():  # the lock is taken at start-up
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.01)
    output = stop(proc, signal.SIGTERM)
    assert proc.returncode == reliability.EXIT_PREEMPTED, output[-4000:]
    assert "stopped by SIGTERM during start-up" in output
    assert not (tmp_path / reliability.RunLock.NAME).exists()
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # nothing was trained
