"""The run directory lock (reliability.RunLock): one holder at a time, also when many processes
race for a fresh directory or for one holding a stale lock; every refused process is told who
holds it; a holder killed outright leaves a lock the next run takes over."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.reliability import RunLock, RunLockedError

REPO = Path(__file__).resolve().parents[1]
RACERS = 16
ROUNDS = 20


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _stale_record(directory: Path, host: str | None = None, job: str | None = None) -> None:
    """A lock file whose holder is gone (nobody holds its lock)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RunLock.NAME).write_text(json.dumps(
        {"host": host or socket.gethostname(), "pid": _dead_pid(), "slurm_job": job,
         "started": "2026-01-01T00:00:00+00:00"}) + "\n")


def _racer(directories: list[str], barrier, results) -> None:
    for round_index, directory in enumerate(directories):
        barrier.wait()
        lock = RunLock(directory)
        try:
            lock.acquire()
            outcome = ("held", "")
        except RunLockedError as err:
            outcome = ("refused", str(err))
        results.put((round_index, os.getpid(), *outcome))
        barrier.wait()  # every racer has tried before the holder lets go
        lock.release()
    results.close()
    results.join_thread()  # the results are sent before the process leaves
    os._exit(0)  # a forked copy of pytest: leave without its exit handlers


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_racing_processes_get_one_holder_and_every_loser_names_it(tmp_path, stale):
    directories = [tmp_path / f"round{i}" for i in range(ROUNDS)]
    if stale:
        for directory in directories:
            _stale_record(directory)
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(RACERS), context.Queue()
    racers = [context.Process(target=_racer, args=([str(d) for d in directories], barrier,
                                                   results)) for _ in range(RACERS)]
    for racer in racers:
        racer.start()
    outcomes = [results.get(timeout=120) for _ in range(RACERS * ROUNDS)]
    for racer in racers:
        racer.join(timeout=60)
        assert racer.exitcode == 0
    for round_index, directory in enumerate(directories):
        mine = [o for o in outcomes if o[0] == round_index]
        holders = [pid for _, pid, what, _ in mine if what == "held"]
        assert len(holders) == 1, (round_index, mine)
        named = f"(host {socket.gethostname()}, pid {holders[0]}) started "
        for _, _, what, message in mine:
            if what == "refused":
                assert named in message, (round_index, message)
        assert not (directory / RunLock.NAME).exists()  # released by its holder
        assert [p.name for p in directory.iterdir()] == []  # no staged file left


def test_second_holder_refused_and_record_names_the_holder(tmp_path):
    with RunLock(tmp_path):
        record = json.loads((tmp_path / RunLock.NAME).read_text())
        assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(RunLockedError,
                           match=re.escape(f"(host {record['host']}, pid {os.getpid()}) "
                                           f"started {record['started']}")):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / RunLock.NAME).exists()


def test_lock_of_a_killed_holder_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from runtime import reliability; reliability.RunLock(sys.argv[1])"
         ".acquire(); print('held', flush=True); sys.stdin.read()", str(tmp_path)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"pid {holder.pid}\\)"):
        RunLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / RunLock.NAME).exists()  # killed: no release
    with caplog.at_level(logging.WARNING), RunLock(tmp_path):
        assert json.loads((tmp_path / RunLock.NAME).read_text())["pid"] == os.getpid()
    assert f"pid {holder.pid} on this host" in caplog.text and "taking it over" in caplog.text


def test_stale_lock_of_another_host_is_refused_unless_it_is_this_slurm_job(tmp_path, caplog,
                                                                           monkeypatch):
    other = f"another-host-{socket.gethostname()}"
    _stale_record(tmp_path, host=other, job="77")
    with pytest.raises(RunLockedError, match=f"lock left on another host \\(host {other}"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # a requeue of that job: its earlier run is gone
    with caplog.at_level(logging.WARNING), RunLock(tmp_path):
        record = json.loads((tmp_path / RunLock.NAME).read_text())
        assert (record["host"], record["pid"], record["slurm_job"]) == \
            (socket.gethostname(), os.getpid(), "77")
    assert "this SLURM job's previous run" in caplog.text


def test_unreadable_lock_file_is_refused_with_its_path(tmp_path):
    (tmp_path / RunLock.NAME).write_text("")
    with pytest.raises(RunLockedError, match="no readable holder record; if no run uses"):
        RunLock(tmp_path).acquire()
