"""Resume-checkpoint choice and its errors: the fallback takes Lightning's ``-vK`` files of the
run, and a corrupt checkpoint is one exception with one clear message (no chained tracebacks)."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

from runtime.checkpointing import (
    CorruptCheckpointError,
    find_resume_checkpoint,
    load_checkpoint_file,
    periodic_checkpoints,
    write_run_id,
)


def _checkpoint(path: Path, step: int, run_id: str) -> None:
    torch.save({"global_step": step, "run_id": run_id}, path)


def test_fallback_takes_the_newest_versioned_file_of_the_run(tmp_path):
    """A second run in a directory holding step00000007.ckpt of another run writes Lightning's
    step00000007-v1.ckpt; with last.ckpt truncated, the fallback resumes from it."""
    for name, step, run in [("step00000005.ckpt", 5, "run-a"), ("step00000007.ckpt", 7, "run-b"),
                            ("step00000007-v1.ckpt", 7, "run-a"),
                            ("step00000003-v2.ckpt", 3, "run-a")]:
        _checkpoint(tmp_path / name, step, run)
    last = tmp_path / "last.ckpt"
    _checkpoint(last, 8, "run-a")
    last.write_bytes(last.read_bytes()[:30])
    write_run_id(tmp_path, "run-a")
    path, ckpt = find_resume_checkpoint(last, fallback_to_previous=True)
    assert path == tmp_path / "step00000007-v1.ckpt" and ckpt["global_step"] == 7
    assert [p.name for p in periodic_checkpoints(tmp_path)] == [
        "step00000007-v1.ckpt", "step00000007.ckpt", "step00000005.ckpt", "step00000003-v2.ckpt"]


def test_versions_of_one_step_newest_first_and_other_names_ignored(tmp_path):
    for name in ["step00000004.ckpt", "step00000004-v2.ckpt", "step00000004-v10.ckpt",
                 "step00000004-v1.ckpt", "stepfoo.ckpt", "step00000004-old.ckpt"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in periodic_checkpoints(tmp_path)] == [
        "step00000004-v10.ckpt", "step00000004-v2.ckpt", "step00000004-v1.ckpt",
        "step00000004.ckpt"]


def _single_error(err: BaseException) -> str:
    text = "".join(traceback.format_exception(err))
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    assert text.count("Traceback (most recent call last)") == 1, text
    return text


def test_corrupt_resume_checkpoint_is_one_exception_with_the_whole_message(tmp_path):
    last = tmp_path / "last.ckpt"
    _checkpoint(last, 3, "run-a")
    last.write_bytes(last.read_bytes()[:25])
    with pytest.raises(CorruptCheckpointError) as caught:
        find_resume_checkpoint(last, fallback_to_previous=False)
    message = str(caught.value)
    assert f"resume checkpoint {last} is corrupt or truncated" in message
    assert "checkpointing.fallback_to_previous=true" in message
    _single_error(caught.value)
    (tmp_path / "other.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptCheckpointError, match="other.ckpt is corrupt") as caught:
        load_checkpoint_file(tmp_path / "other.ckpt")
    _single_error(caught.value)
