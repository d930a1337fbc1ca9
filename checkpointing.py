"""Checkpoint files: atomic writes and loading with clear errors."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the target directory, fsync, then rename.

    A crash mid-write leaves the previous file with the same name intact.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("checkpoint written: %s", path)


def load_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """torch.load a checkpoint on the CPU, with one clear error for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, bad pickle, ...
        raise RuntimeError(f"{what} {path} is corrupt or truncated ({type(err).__name__}: "
                           f"{err}); delete it or point to another checkpoint") from err


PERIODIC_PREFIX = "step"  # periodic checkpoints are <save_dir>/checkpoints/step<NNNNNNNN>.ckpt
LAST_NAME = "last.ckpt"  # rewritten in place; what resume reads by default
ARCHITECTURE_KEYS = ("length", "hidden_size", "n_blocks", "n_heads", "cond_dim", "mlp_ratio")


def periodic_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Periodic checkpoints in ``directory``, newest (highest step) first."""
    def step(path: Path) -> int:
        digits = path.stem[len(PERIODIC_PREFIX):]
        return int(digits) if digits.isdigit() else -1
    found = [p for p in Path(directory).glob(f"{PERIODIC_PREFIX}*.ckpt") if step(p) >= 0]
    return sorted(found, key=step, reverse=True)


def find_resume_checkpoint(resume_path: str | os.PathLike, fallback_to_previous: bool,
                           ) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its loaded content; ``(None, None)`` for a fresh run.

    ``resume_path`` is used when it exists and loads. If it is corrupt (or missing while
    periodic checkpoints sit next to it), this raises with the file named, unless
    ``fallback_to_previous``: then the newest periodic checkpoint that loads is used, and logged.
    """
    resume_path = Path(resume_path)
    periodic = [p for p in periodic_checkpoints(resume_path.parent) if p != resume_path]
    if resume_path.is_file():
        try:
            return resume_path, load_checkpoint_file(resume_path, "resume checkpoint")
        except RuntimeError as err:
            if not fallback_to_previous:
                raise RuntimeError(f"{err}. Or set checkpointing.fallback_to_previous=true to "
                                   "resume from the newest readable periodic checkpoint") from err
            log.error("%s", err)
    elif not periodic:
        return None, None
    elif not fallback_to_previous:
        raise FileNotFoundError(
            f"resume checkpoint {resume_path} is missing but {resume_path.parent} holds periodic "
            f"checkpoints ({periodic[0].name}, ...): set checkpointing.resume_ckpt_path=<file>, "
            "or checkpointing.fallback_to_previous=true to take the newest readable one, or a "
            "new checkpointing.save_dir to start afresh")
    for candidate in periodic:
        try:
            ckpt = load_checkpoint_file(candidate, "periodic checkpoint")
        except RuntimeError as err:
            log.error("%s", err)
            continue
        log.warning("checkpointing.fallback_to_previous=true: resuming from %s instead of %s",
                    candidate, resume_path)
        return candidate, ckpt
    raise RuntimeError(f"no readable checkpoint: {resume_path} and every periodic checkpoint in "
                       f"{resume_path.parent} failed to load; start afresh with a new "
                       "checkpointing.save_dir")


def check_compatible(checkpoint: dict[str, Any], config, vocab_size: int, path: str | os.PathLike,
                     what: str = "resume checkpoint") -> None:
    """Raise if the model in ``checkpoint`` cannot be continued with ``config`` and the data's
    vocabulary (``vocab_size = len(tokenizer)``)."""
    hparams = checkpoint.get("hyper_parameters", {})
    saved_vocab = hparams.get("vocab_size")
    if saved_vocab is not None and saved_vocab != vocab_size:
        raise ValueError(f"{what} {path} has a model over {saved_vocab} tokens but the data's "
                         f"tokenizer (data={config.data.name}) has {vocab_size}: use the data it "
                         "was trained on, or a new checkpointing.save_dir")
    saved_model = hparams.get("config", {}).get("model", {})
    for key in ARCHITECTURE_KEYS:
        if key in saved_model and saved_model[key] != config.model[key]:
            raise ValueError(f"{what} {path} has model.{key}={saved_model[key]} but the config "
                             f"has model.{key}={config.model[key]}: pass the same model "
                             "settings, or a new checkpointing.save_dir")
    saved_algo = hparams.get("config", {}).get("algo", {}).get("name")
    if saved_algo is not None and saved_algo != config.algo.name:
        raise ValueError(f"{what} {path} was trained with algo={saved_algo} but the config has "
                         f"algo={config.algo.name}")
