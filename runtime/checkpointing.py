"""Checkpoints, in one home: the file format, atomic background writes, loading with clear
errors, the one compatibility check (resume, teacher loading, evaluation), the resume config
check, the run identity, and the step / final checkpoint callbacks.

File format: Lightning's checkpoint dict (``state_dict``, ``optimizer_states``, ``loops``, ...)
plus ``ema`` (algo.FlowLM), ``rng_states`` (reliability.RNGStates), ``run_id``
(:class:`RunIdentity`) and ``hyper_parameters = {"config": <resolved config>, "vocab_size"}``.
"""

from __future__ import annotations

import collections
import copy
import datetime
import fnmatch
import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from runtime.config import ConfigError

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"  # temporary files: .<name>.<random>.tmp next to the target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class HostBuffers:
    """Pinned CPU buffers for device -> host checkpoint copies, reused from save to save.

    Allocating (and page-locking) gigabytes of host memory costs more than the copy itself,
    and it stalls the training thread wherever it runs: the first background save of a
    2.7 GB DiT-small state with the buffers allocated in the writer thread cost training
    3.3 s on an H200 (bench/end_to_end.py), later saves about one step. So they are
    allocated once, ahead of the first save (``reserve``, :class:`ReserveHostBuffers`); the
    buffers of the previous save are free again once its write is done (one write in flight).
    Buffers are matched to storages by size.
    """

    def __init__(self, allocate=None) -> None:
        # allocate(nbytes) -> a host storage (pinned; the tests give plain CPU memory)
        self._allocate = allocate or (lambda size: torch.empty(
            size, dtype=torch.uint8, pin_memory=True).untyped_storage())
        self._buffers: list[torch.UntypedStorage] = []
        self._free: dict[int, list[torch.UntypedStorage]] = {}
        self._used: list[torch.UntypedStorage] = []

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self._buffers)

    def reserve(self, sizes: list[int]) -> None:
        """Hold pinned buffers of exactly ``sizes`` bytes (any order), allocating what is
        missing and dropping buffers of other sizes."""
        self.start()
        for size in sizes:
            self._take(size)
        self.finish()

    def start(self) -> None:
        """Begin a save: every buffer is free to take."""
        self._free = collections.defaultdict(list)
        for b in self._buffers:
            self._free[b.nbytes()].append(b)
        self._used = []

    def finish(self) -> None:
        """End a save: keep only the buffers it used."""
        self._buffers, self._free = self._used, {}

    def fit(self, sizes: list[int]) -> bool:
        """Whether the buffers are those of storages of ``sizes`` bytes (as a multiset)."""
        return collections.Counter(b.nbytes() for b in self._buffers) == \
            collections.Counter(sizes)

    def _take(self, size: int) -> torch.UntypedStorage:
        pool = self._free.get(size)
        buffer = pool.pop() if pool else self._allocate(size)
        self._used.append(buffer)
        return buffer

    def copy(self, storage: torch.UntypedStorage) -> torch.UntypedStorage:
        buffer = self._take(storage.nbytes())
        buffer.copy_(storage, non_blocking=True)  # complete after the stream's work
        return buffer


def snapshot(obj: Any, copy_storage, _memo: dict | None = None) -> Any:
    """A copy of a checkpoint dict whose tensors live in the storages ``copy_storage(storage)``
    returns for each distinct storage (views and tied weights keep sharing theirs).

    Containers are rebuilt, other leaves deep-copied, so training can go on changing the live
    tensors while the copy is written. A tensor is rebuilt on the device of the storage it gets.
    """
    memo: dict = {} if _memo is None else _memo
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = (obj.device, storage.data_ptr(), storage.nbytes())
        if key not in memo:
            memo[key] = copy_storage(storage)
        new = memo[key]
        copy_ = torch.empty(0, dtype=obj.dtype, device=new.device).set_(
            new, obj.storage_offset(), obj.size(), obj.stride())
        if isinstance(obj, torch.nn.Parameter):
            return torch.nn.Parameter(copy_, requires_grad=obj.requires_grad)
        return copy_
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the type and attributes (a state_dict's ``_metadata``)
        for k, v in obj.items():
            out[k] = snapshot(v, copy_storage, memo)
        return out
    if isinstance(obj, list):
        return [snapshot(v, copy_storage, memo) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(snapshot(v, copy_storage, memo) for v in obj)
    return copy.deepcopy(obj)


def snapshot_to_cpu(obj: Any, buffers: HostBuffers | None = None) -> Any:
    """:func:`snapshot` with every storage on the CPU (a clone of a CPU storage, a copy of a
    device one: for CPU tensors ``torch.save`` of the snapshot and of the original give the
    same bytes). With ``buffers``, device storages are copied asynchronously into reused
    pinned buffers, complete once the current stream's work is (an event, or a synchronize).
    Device tensors come back as CPU tensors (the file records ``cpu`` as their location;
    loads map them as usual)."""
    if buffers is not None:
        buffers.start()

    def to_cpu(storage: torch.UntypedStorage) -> torch.UntypedStorage:
        if storage.device.type == "cpu":
            return storage.clone()
        return buffers.copy(storage) if buffers is not None else storage.cpu()

    try:
        return snapshot(obj, to_cpu)
    finally:
        if buffers is not None:
            buffers.finish()


def device_storage_sizes(obj: Any) -> list[int]:
    """Bytes of each distinct device storage of ``obj``, in the order :func:`snapshot` meets
    them (its walk and its sharing key; nothing copied)."""
    sizes: list[int] = []
    seen: set = set()
    for t in _tensors(obj):
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr(), storage.nbytes())
        if t.device.type != "cpu" and key not in seen:
            seen.add(key)
            sizes.append(storage.nbytes())
    return sizes


def write_atomically(checkpoint: dict[str, Any], path: Path, mode: int) -> None:
    """torch.save to a temporary file next to ``path``, fsync, chmod ``mode``, rename.

    A crash or kill mid-write leaves the previous ``path`` intact (and at worst a
    ``.<name>.*.tmp`` file, removed on resume by :func:`remove_stale_temporaries`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600; checkpoints follow the umask like any file
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power loss
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CheckpointWriteError(RuntimeError):
    """A background checkpoint write failed; raised in the training thread."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Crash-safe checkpoint files (:func:`write_atomically`), written in the background.

    ``save_checkpoint`` takes a snapshot of the state and hands the file write to a thread,
    so training neither waits for the disk nor for the device: the device -> host copies
    are queued on the current stream into reused pinned buffers (:class:`HostBuffers`) and
    the thread waits for an event recorded after them. The queue order makes the snapshot
    the state at the save, whatever the steps queued after it change. The buffers are
    allocated ahead of the first save by :class:`ReserveHostBuffers` (``reserve_host_buffers``,
    at the end of a run's first optimizer step): page-locking gigabytes stalls training in
    whichever thread it runs (3.3 s at a DiT-small save on an H200, measured with the
    allocation in the writer thread). When they do not fit (a state whose storages changed,
    a run without that callback), the snapshot is first a copy on the device (fast) and the
    thread allocates the missing buffers and copies it to the host on a side stream; if the
    device has no room for that copy, the main thread allocates them (logged).

    At most one write is in flight: a new save (or a removal) first waits for the previous
    write. An error in the writer thread is raised as :class:`CheckpointWriteError` in the
    training thread at the next save, at :meth:`wait` (called before the process exits) or
    at teardown; it is never dropped. ``background=False`` writes synchronously.
    """

    def __init__(self, background: bool = True) -> None:
        super().__init__()
        self.background = background
        self._mode = 0o666 & ~_umask()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending_path: Path | None = None
        self._host = HostBuffers()

    def _write(self, checkpoint: dict[str, Any], path: Path, ready, on_device: bool) -> None:
        try:
            if ready is not None:
                ready.synchronize()  # the copies queued before the event are complete
            if on_device:
                device = next(t.device for t in _tensors(checkpoint) if t.device.type != "cpu")
                with torch.cuda.device(device):
                    side = torch.cuda.Stream()
                    with torch.cuda.stream(side):
                        checkpoint = snapshot_to_cpu(checkpoint, buffers=self._host)
                    side.synchronize()
            write_atomically(checkpoint, path, self._mode)
            log.info("checkpoint written: %s", path)
        except BaseException as err:  # surfaced by wait() in the training thread
            self._error = err

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointWriteError(f"writing checkpoint {self._pending_path} failed "
                                       f"({type(err).__name__}: {err}); the previous file with "
                                       "that name is intact") from err

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        self.wait()
        path = Path(path)
        self._pending_path = path
        if not self.background:
            write_atomically(checkpoint, path, self._mode)
            log.info("checkpoint written: %s", path)
            return
        sizes = device_storage_sizes(checkpoint)
        ready, on_device = None, False
        if not sizes or {t.device.type for t in _tensors(checkpoint)} - {"cpu", "cuda"}:
            state = snapshot_to_cpu(checkpoint)  # CPU state, or a device without CUDA events
            sizes = []
        elif self._host.fit(sizes):
            state = snapshot_to_cpu(checkpoint, buffers=self._host)
        else:
            try:
                state = snapshot(checkpoint, lambda s: s.clone())  # device storages stay there
                on_device = True
            except torch.OutOfMemoryError:
                log.info("no device memory to stage the checkpoint (%.1f GiB): allocating its "
                         "pinned host buffers in the training thread", sum(sizes) / 2**30)
                state = snapshot_to_cpu(checkpoint, buffers=self._host)
        if sizes:
            ready = torch.cuda.Event()
            ready.record()
        self._thread = threading.Thread(target=self._write, args=(state, path, ready, on_device),
                                        name="checkpoint-writer", daemon=False)
        self._thread.start()

    def reserve_host_buffers(self, checkpoint: dict[str, Any]) -> float:
        """Allocate the pinned buffers of ``checkpoint``'s device storages now (in the calling
        thread), so that the first background save only copies; returns the GiB held. Nothing
        for a foreground writer or a checkpoint without CUDA storages."""
        sizes = device_storage_sizes(checkpoint)
        devices = {t.device.type for t in _tensors(checkpoint)} - {"cpu"}
        if not self.background or not sizes or devices != {"cuda"}:
            return 0.0
        self.wait()  # a write in flight may still be reading the buffers
        self._host.reserve(sizes)
        return self._host.nbytes / 2**30

    def remove_checkpoint(self, path) -> None:
        self.wait()
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        self.wait()


def _tensors(obj: Any):
    """The tensors of a checkpoint dict in :func:`snapshot`'s order (it deep-copies named
    tuples as leaves, so they are not walked)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list) or (isinstance(obj, tuple) and not hasattr(obj, "_fields")):
        for v in obj:
            yield from _tensors(v)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete ``.*.ckpt.*.tmp`` files left by a process killed mid-write (logged)."""
    stale = sorted(Path(directory).glob(f".*.ckpt.*{TMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
        log.warning("removed %s, a partial checkpoint write of an earlier process", path)
    return stale


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but does not load; the message names the file and the cause."""


def load_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """torch.load a checkpoint on the CPU, with one clear error for missing or corrupt files
    (:class:`CorruptCheckpointError`, the loader's own error in its message, not chained)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, bad pickle, ...
        raise CorruptCheckpointError(
            f"{what} {path} is corrupt or truncated ({type(err).__name__}: {err}); delete it or "
            "point to another checkpoint") from None


PERIODIC_PREFIX = "step"  # periodic checkpoints are <save_dir>/checkpoints/step<NNNNNNNN>.ckpt
LAST_NAME = "last.ckpt"  # rewritten in place; what resume reads by default
RUN_ID_KEY = "run_id"  # checkpoint entry: the run's id, set at its first launch, kept on resume
RUN_ID_NAME = "run_id"  # <save_dir>/checkpoints/run_id: the id of the run writing that directory
ARCHITECTURE_KEYS = ("length", "hidden_size", "n_blocks", "n_heads", "cond_dim", "mlp_ratio")


# step<N>.ckpt, or step<N>-v<K>.ckpt: Lightning's name when step<N>.ckpt already exists there
PERIODIC_NAME = re.compile(rf"{PERIODIC_PREFIX}(\d+)(?:-v(\d+))?\.ckpt")


def periodic_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Periodic checkpoints in ``directory``, newest (highest step, then highest ``-vK``)
    first."""
    def order(path: Path) -> tuple[int, int]:
        match = PERIODIC_NAME.fullmatch(path.name)
        return int(match.group(1)), int(match.group(2) or 0)
    found = [p for p in Path(directory).glob(f"{PERIODIC_PREFIX}*.ckpt")
             if PERIODIC_NAME.fullmatch(p.name)]
    return sorted(found, key=order, reverse=True)


def find_resume_checkpoint(resume_path: str | os.PathLike, fallback_to_previous: bool,
                           run_id: str | None = None,
                           ) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its loaded content; ``(None, None)`` for a fresh run.

    ``resume_path`` is used when it exists and loads. If it is corrupt (or missing while
    periodic checkpoints sit next to it), this raises with the file named, unless
    ``fallback_to_previous``: then the newest periodic checkpoint that loads and belongs to the
    run ``run_id`` (default: the id recorded next to ``resume_path``, :func:`read_run_id`) is
    used, and logged. Checkpoints of other runs in the same directory are never taken.
    """
    resume_path = Path(resume_path)
    if run_id is None:
        run_id = read_run_id(resume_path.parent)
    periodic = [p for p in periodic_checkpoints(resume_path.parent) if p != resume_path]
    if resume_path.is_file():
        try:
            return resume_path, load_checkpoint_file(resume_path, "resume checkpoint")
        except CorruptCheckpointError as err:
            if not fallback_to_previous:
                raise CorruptCheckpointError(
                    f"{err}. Or set checkpointing.fallback_to_previous=true to resume from the "
                    "newest readable periodic checkpoint") from None
            log.error("%s", err)
    elif not periodic:
        return None, None
    elif not fallback_to_previous:
        raise FileNotFoundError(
            f"resume checkpoint {resume_path} is missing but {resume_path.parent} holds periodic "
            f"checkpoints ({periodic[0].name}, ...): set checkpointing.resume_ckpt_path=<file>, "
            "or checkpointing.fallback_to_previous=true to take the newest readable one, or a "
            "new checkpointing.save_dir to start afresh")
    if run_id is None:
        raise RuntimeError(f"checkpointing.fallback_to_previous=true, but {resume_path.parent} "
                           f"has no {RUN_ID_NAME} file naming the run, so its periodic "
                           "checkpoints cannot be told apart from another run's; set "
                           "checkpointing.resume_ckpt_path=<file> explicitly")
    for candidate in periodic:
        try:
            ckpt = load_checkpoint_file(candidate, "periodic checkpoint")
        except CorruptCheckpointError as err:
            log.error("%s", err)
            continue
        if ckpt.get(RUN_ID_KEY) != run_id:
            log.warning("skipping %s: written by run %s, not by this run (%s)", candidate,
                        ckpt.get(RUN_ID_KEY), run_id)
            continue
        log.warning("checkpointing.fallback_to_previous=true: resuming from %s instead of %s",
                    candidate, resume_path)
        return candidate, ckpt
    raise RuntimeError(f"no readable checkpoint: {resume_path} failed to load and no periodic "
                       f"checkpoint of run {run_id} in {resume_path.parent} loads; start afresh "
                       "with a new checkpointing.save_dir")


def architecture_differences(saved_model, model) -> list[tuple[str, Any, Any]]:
    """(key, saved, current) for each architecture key (``ARCHITECTURE_KEYS``) on which a saved
    model config and the current one disagree."""
    return [(key, saved_model[key], model[key]) for key in ARCHITECTURE_KEYS
            if key in saved_model and saved_model[key] != model[key]]


@dataclass(frozen=True)
class Compatibility:
    """What a saved model and the current run disagree on: the one check of resume
    (:func:`check_compatible`), teacher loading (models/teacher.py) and evaluation
    (main.load_for_eval). Each field is ``(saved, current)`` or None when they agree (or the
    checkpoint does not record it); ``model`` lists ``(key, saved, current)``."""

    vocab_size: tuple[int, int] | None
    algo: tuple[str, str] | None
    model: tuple[tuple[str, Any, Any], ...]


def compatibility(saved_vocab: int | None, saved_model, saved_algo: str | None,
                  vocab_size: int, model=None, algo: str | None = None) -> Compatibility:
    """Compare a checkpoint's vocabulary, model config and algorithm with the run's
    (``model`` / ``algo`` None: not compared, and ``saved_model`` / ``saved_algo`` unread, e.g.
    evaluation builds the checkpoint's own)."""
    vocab = (None if saved_vocab is None or saved_vocab == vocab_size
             else (int(saved_vocab), int(vocab_size)))
    algos = (None if algo is None or saved_algo is None or saved_algo == algo
             else (saved_algo, algo))
    shape = tuple(architecture_differences(saved_model, model)) if model is not None else ()
    return Compatibility(vocab, algos, shape)


def check_compatible(checkpoint: dict[str, Any], config, vocab_size: int, path: str | os.PathLike,
                     what: str = "resume checkpoint") -> None:
    """Raise if the model in ``checkpoint`` cannot be continued with ``config`` and the data's
    vocabulary (``vocab_size = len(tokenizer)``)."""
    hparams = checkpoint.get("hyper_parameters", {})
    saved_config = hparams.get("config", {})
    found = compatibility(hparams.get("vocab_size"), saved_config.get("model", {}),
                          saved_config.get("algo", {}).get("name"), vocab_size, config.model,
                          config.algo.name)
    if found.vocab_size is not None:
        raise ValueError(f"{what} {path} has a model over {found.vocab_size[0]} tokens but the "
                         f"data's tokenizer (data={config.data.name}) has {vocab_size}: use the "
                         "data it was trained on, or a new checkpointing.save_dir")
    for key, saved, now in found.model:
        raise ValueError(f"{what} {path} has model.{key}={saved} but the config "
                         f"has model.{key}={now}: pass the same model "
                         "settings, or a new checkpointing.save_dir")
    if found.algo is not None:
        raise ValueError(f"{what} {path} was trained with algo={found.algo[0]} but the config has "
                         f"algo={config.algo.name}")


# --------------------------------------------------------------------------- run identity


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def read_run_id(directory: str | os.PathLike) -> str | None:
    """The run id recorded in ``directory/run_id`` (None if there is none)."""
    path = Path(directory) / RUN_ID_NAME
    return path.read_text().strip() or None if path.is_file() else None


def write_run_id(directory: str | os.PathLike, run_id: str) -> None:
    path = Path(directory) / RUN_ID_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")


class RunIdentity(pl.Callback):
    """Write the run's id into every checkpoint (``checkpoint["run_id"]``)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[RUN_ID_KEY] = self.run_id


# --------------------------------------------------------------------------- config on resume

# Keys a resumed run may change without resume.allow_changes (fnmatch patterns over dotted
# keys): they change how the run is watched, stored, split over devices (the global batch
# stays: loader.global_batch_size is not here) or how long it runs, not what it computes.
RESUMABLE_CHANGES = (
    "mode",
    "trainer.max_steps", "trainer.val_check_interval", "trainer.limit_val_batches",
    "trainer.log_every_n_steps", "trainer.num_sanity_val_steps", "trainer.enable_progress_bar",
    "trainer.profiler",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
    "trainer.accumulate_grad_batches",  # derived from devices/nodes/batch_size
    "loader.batch_size", "loader.eval_batch_size", "loader.eval_global_batch_size",
    "loader.num_workers", "loader.pin_memory",
    "training.compile", "training.compile_tuning",  # how it runs, not what it computes
    "strategy.*",  # ddp and fsdp write the same gathered file
    "data.cache_dir", "data.num_proc", "data.map_batch_size",
    "algo.teacher_path", "algo.teacher_f_path", "algo.teacher_g_path",  # files may move
    "wandb.*", "checkpointing.*", "callbacks.*", "resume.*", "reliability.*",
    "eval.*", "sampling.*", "generate.*",
)
# changes that resume.allow_changes makes take effect on the restored optimizer/EMA state
# (ResumeOverrides); others (seed, dropout, warm-up, ...) take effect through the new config
OPTIMIZER_KEYS = {"optim.lr": "lr", "optim.weight_decay": "weight_decay", "optim.eps": "eps"}
ABSENT = "<absent>"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}`` (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    if not tree and prefix:
        return {prefix: {}}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every leaf that differs (missing on one side: ``ABSENT``)."""
    old, new = flatten(saved), flatten(current)
    return {key: (old.get(key, ABSENT), new.get(key, ABSENT))
            for key in sorted(old.keys() | new.keys()) if old.get(key, ABSENT)
            != new.get(key, ABSENT)}


def _matches(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, p) or key.startswith(p + ".") for p in patterns)


def check_resume_config(checkpoint: dict[str, Any], config: DictConfig, path: str | os.PathLike,
                        ) -> dict[str, tuple[Any, Any]]:
    """Refuse a resume whose config differs from the checkpoint's beyond what may change.

    Returns the changes that pass (every difference, allowed ones included). Raises
    ``ConfigError`` listing ``key: old -> new`` for the differences that are neither in
    :data:`RESUMABLE_CHANGES` nor named in ``resume.allow_changes``, and when
    ``trainer.max_steps`` does not exceed the checkpoint's step.
    """
    step = int(checkpoint.get("global_step", 0))
    max_steps = int(config.trainer.max_steps)
    if 0 <= max_steps <= step:
        raise ConfigError(
            f"trainer.max_steps={max_steps}, but the resume checkpoint {path} is at step {step}: "
            "there is nothing to train. Raise trainer.max_steps to continue the run, evaluate "
            f"it with mode=sample_eval eval.checkpoint_path={path}, or start afresh with a new "
            "checkpointing.save_dir")
    saved = checkpoint.get("hyper_parameters", {}).get("config")
    if saved is None:
        raise ConfigError(f"resume checkpoint {path} has no saved config (not written by this "
                          "project's training); start afresh with a new checkpointing.save_dir")
    current = OmegaConf.to_container(config, resolve=True)
    changes = config_changes(saved, current)
    allowed = list(config.get("resume", {}).get("allow_changes", []) or [])
    refused = {k: v for k, v in changes.items()
               if not _matches(k, RESUMABLE_CHANGES) and not _matches(k, allowed)}
    if refused:
        lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(
            f"resuming {path} (step {step}) with a config that changes what the run computes:\n"
            f"{lines}\nPass the checkpoint's values, or name the keys in "
            f"resume.allow_changes=[{','.join(refused)}] to apply the change from step {step} "
            "on (recorded in config_history.jsonl), or use a new checkpointing.save_dir")
    for key in changes:
        if _matches(key, allowed) and not _matches(key, RESUMABLE_CHANGES):
            log.warning("resume.allow_changes: %s changes from %r to %r at step %d", key,
                        changes[key][0], changes[key][1], step)
    return changes


def record_launch(save_dir: str | os.PathLike, run_id: str, step: int,
                  changes: dict[str, tuple[Any, Any]]) -> Path:
    """Append this launch (time, step, run id, config changes) to ``config_history.jsonl``."""
    path = Path(save_dir) / "config_history.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"launch": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
             "run_id": run_id, "step": step,
             "changes": {k: [_plain(o), _plain(n)] for k, (o, n) in changes.items()}}
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return path


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool, list, dict, type(None))) \
        else repr(value)


class ResumeOverrides(pl.Callback):
    """Apply allowed changes of ``optim.*`` and ``training.ema`` to the restored state.

    Lightning restores the optimizer's param groups (their lr, eps, weight decay), the
    scheduler's base learning rates and the EMA decay from the checkpoint, so a changed
    config value would otherwise be ignored. Runs in ``on_train_start``, after the restore.
    """

    def __init__(self, config: DictConfig, changed: list[str]) -> None:
        self.config = config
        self.changed = set(changed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        oc = self.config.optim
        for key, group_key in OPTIMIZER_KEYS.items():
            if key not in self.changed:
                continue
            value = float(oc[key.split(".", 1)[1]])
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    if group_key == "lr":
                        group["initial_lr"] = value
                    group[group_key] = value
        if {"optim.beta1", "optim.beta2"} & self.changed:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["betas"] = (float(oc.beta1), float(oc.beta2))
        if "optim.lr" in self.changed or any(k.startswith("lr_scheduler.") for k in self.changed):
            for config in trainer.lr_scheduler_configs:
                scheduler = config.scheduler
                scheduler.base_lrs = [float(oc.lr)] * len(scheduler.base_lrs)
                lambdas = getattr(scheduler, "lr_lambdas", None)
                if lambdas is not None:  # the lr of the current step under the new schedule
                    for group, base, fn in zip(scheduler.optimizer.param_groups,
                                               scheduler.base_lrs, lambdas):
                        group["lr"] = base * fn(scheduler.last_epoch)
        if "training.ema" in self.changed:
            pl_module.ema.decay = float(self.config.training.ema)
        if self.changed:
            log.info("applied to the restored state: %s", ", ".join(sorted(self.changed)))


# --------------------------------------------------------------------------- step callbacks


class ReserveHostBuffers(pl.Callback):
    """At the end of the first optimizer step of a fit (the optimizer's state exists from
    then on), allocate the pinned host buffers of the trainer's background checkpoint writer
    (:meth:`AtomicCheckpointIO.reserve_host_buffers`) from the checkpoint as it would be
    saved now, so that no save during training allocates them. CUDA runs only; every rank
    takes part in building the checkpoint (gathering sharded state is a collective), the
    writing rank holds the buffers. Logs the size and the time it took."""

    def __init__(self) -> None:
        self.done = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        io = trainer.strategy.checkpoint_io
        if (self.done or trainer.global_step == 0 or pl_module.device.type != "cuda"
                or not isinstance(io, AtomicCheckpointIO) or not io.background):
            return
        self.done = True
        start = time.perf_counter()
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        if trainer.is_global_zero:
            gib = io.reserve_host_buffers(checkpoint)
            log.info("pinned %.2f GiB of host memory for background checkpoint writes in "
                     "%.1f s", gib, time.perf_counter() - start)


class FinalCheckpoint(pl.Callback):
    """Write ``checkpoint_path`` when the optimizer step that reaches ``trainer.max_steps`` ends.

    A checkpoint saved after ``trainer.fit`` returns records the epoch as finished, so a run
    continued from it with a larger ``max_steps`` would start a new epoch (a new data order)
    instead of the next unseen batch. Saved here, at the same point as the periodic
    checkpoints, it is an exact resume point. ``saved_step`` is the step written (or None).
    """

    def __init__(self, checkpoint_path: str | os.PathLike) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.saved_step: int | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if 0 < trainer.max_steps <= step and self.saved_step != step:
            trainer.save_checkpoint(self.checkpoint_path)
            self.saved_step = step


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, saving only at optimizer steps (every_n_train_steps).

    Lightning also writes ``last`` when training ends if this callback has not yet written it
    during the run; that copy records the epoch as finished (a continued run would start a new
    epoch) and, next to an existing last.ckpt, lands in ``last-v1.ckpt``. The final state is
    written by :class:`FinalCheckpoint` instead, from inside the epoch."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        # at max_steps FinalCheckpoint has just written last.ckpt: once is enough
        if 0 < trainer.max_steps <= trainer.global_step:
            return
        super()._save_last_checkpoint(trainer, monitor_candidates)
