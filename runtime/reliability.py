"""Lightning callbacks that keep long runs alive and reproducible (the checkpoint writers live in
checkpointing.py).

* :class:`NonFiniteGuard`: a step whose loss or gradients are not finite is skipped (no
  parameter, optimizer-state or EMA update) and counted; too many in a row stop the run with
  the last good state in ``last.ckpt``. With a fused AdamW the skip happens on the device and
  the host reads the verdict later: no host-device sync per step.
* :class:`PreemptionHandler`: SIGUSR1/SIGTERM (SLURM's warning before the time limit, or a
  preemption) and SIGINT write ``last.ckpt`` at the next optimizer-step boundary, requeue the
  SLURM job (SIGUSR1/2) and stop.
  The process then exits with :data:`EXIT_PREEMPTED` (75, EX_TEMPFAIL: "stopped, resume me"),
  without a validation pass; Ctrl-C (SIGINT) does the same and exits with 130 (a second
  Ctrl-C aborts at once, without a checkpoint). During start-up (:func:`stop_at_startup`)
  the same signals stop the process at once with the same exit status.
* :class:`RunLock`: one training process per run directory (a file lock held for the run's
  life; the lock file names host, pid and start time).
* :class:`ResplitLoop`: resuming with another accumulation (another device count for the same
  global batch) rescales Lightning's micro-batch counters to the new accumulation.
* :class:`RNGStates`: the global random states (python, numpy, torch CPU and CUDA) of every rank
  travel in checkpoints, so dropout continues the same streams after a resume.

All ranks take the same decision: flags are reduced over the process group before acting.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import fcntl
import json
import logging
import os
import random
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.distributed.tensor import DTensor

from runtime.monitoring import (
    StepBoundaryStop,
    logging_step,
    pop_landed,
    readable_later,
    step_and_epoch,
    write_to_loggers,
)
from runtime.optim import StepHealth, gradient_norms, gradients, scales_on_device

log = logging.getLogger(__name__)

RNG_STATES_KEY = "rng_states"  # checkpoint entry: list of per-rank RNG states, index = global rank
REQUEUE_COMMAND = "scontrol"


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


def save_and_flush(trainer: pl.Trainer, path: Path) -> None:
    """Save ``path`` and return once it is on disk on every rank's behalf: the writer thread
    of rank 0 has finished and all ranks passed a barrier. Used before leaving with an error
    status, which lets ``srun --kill-on-bad-exit`` kill rank 0 mid-write."""
    trainer.save_checkpoint(path)
    wait = getattr(trainer.strategy.checkpoint_io, "wait", None)
    if wait is not None:
        wait()
    trainer.strategy.barrier("checkpoint flushed")


def _any_rank(trainer: pl.Trainer, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on at least one rank."""
    return bool(trainer.strategy.reduce_boolean_decision(bool(flag), all=False))


def _any_rank_on_device(trainer: pl.Trainer, flag: torch.Tensor) -> torch.Tensor:
    """``flag`` OR-ed over ranks on the device (an all-reduce, no host sync)."""
    if trainer.world_size > 1 and torch.distributed.is_initialized():
        reduced = flag.to(torch.int32)
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
        return reduced.bool()
    return flag


SIGNAL_LAG = 2  # multi-process runs act on a signal this many optimizer steps after it arrives


# --------------------------------------------------------------------------- non-finite steps


class NonFiniteGuard(pl.Callback):
    """Skip optimizer steps whose loss or gradients are not finite; stop after too many in a row.

    The loss of every micro-batch is checked in ``on_before_backward`` (kept on the device, no
    sync); the gradients once per optimizer step in ``on_before_optimizer_step`` (after the
    last backward, before clipping and ``optimizer.step``). The flag is reduced over ranks (with
    FSDP each rank sees only its gradient shard). Two ways to skip, with the same result
    (parameters, optimizer state and EMA untouched; the learning-rate schedule and the data
    advance, so the next step draws fresh noise and times):

    * on the device, when the optimizer is a fused AdamW and no loss scaler runs (the default
      on CUDA, bf16 or fp32): the flag goes to the optimizer's kernel as ``found_inf`` (which
      then leaves parameters, moments and step counts as they were) and to the EMA update as a
      device tensor, both through the module's ``step_health`` (optim.StepHealth). Nothing
      waits for the GPU: the host reads the flag once the step has run (a pinned copy and an
      event), a step or two later, and only then counts and logs it (a host sync per step
      would idle the GPU while Lightning's Python runs between steps);
    * on the host otherwise: the flag is read (one sync), and a bad step's gradients are set to
      ``None``, so the optimizer leaves parameters and state untouched.

    After ``max_consecutive`` skipped steps in a row the state (unchanged since the last good
    step) is saved to ``checkpoint_path`` and :class:`NonFiniteTrainingError` is raised.
    """

    def __init__(self, max_consecutive: int, checkpoint_path: str | os.PathLike) -> None:
        self.max_consecutive = max_consecutive
        self.checkpoint_path = Path(checkpoint_path)
        self.skipped_total = 0
        self.consecutive = 0
        self._loss_nonfinite: torch.Tensor | bool = False
        self._first_bad_step: int | None = None
        self._last_bad_step: int | None = None
        # device-side skips not read yet: (step, flag on the host (pinned) or the CPU, event)
        self._pending: collections.deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = \
            collections.deque()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        # a device tensor, OR-ed over the micro-batches of the step: no host sync here
        self._loss_nonfinite = ~torch.isfinite(loss.detach()).all() | self._loss_nonfinite

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """The step's verdict, written to ``pl_module.step_health`` (optim.StepHealth) for the
        clipping, the optimizer's kernel and the EMA update that follow."""
        health: StepHealth = pl_module.step_health
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = gradients(optimizer)
        sharded = any(isinstance(g, DTensor) for g in grads)
        flag = self._loss_nonfinite
        norms = None
        if grads:
            # this rank's shard under FSDP (DTensor); the verdict is reduced over ranks below
            norms = gradient_norms([g.to_local() if isinstance(g, DTensor) else g for g in grads])
            flag = ~torch.isfinite(norms).all() | flag
        self._loss_nonfinite = False
        # the clipping that follows reuses them (a rank's shard norms are not the global ones)
        health.grad_norms = None if sharded else norms
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if isinstance(flag, torch.Tensor) and scales_on_device(optimizer, scaler, grads):
            flag = _any_rank_on_device(trainer, flag)
            health.found_inf = flag.float()  # read by the fused kernel of this step only
            health.skipped = flag
            self._pending.append((trainer.global_step, *readable_later(flag)))
            self._read_flags(trainer, pl_module, wait=False)
            return
        health.found_inf = None
        bad = _any_rank(trainer, bool(flag))  # the step's one host sync
        health.skipped = bad
        self._count(trainer.global_step, bad)
        if bad:
            for p in params:
                p.grad = None  # the optimizer skips parameters without a gradient

    def _count(self, step: int, bad: bool) -> None:
        if not bad:
            self.consecutive = 0
            self._first_bad_step = None
            return
        self.skipped_total += 1
        self.consecutive += 1
        if self._first_bad_step is None:
            self._first_bad_step = step
        self._last_bad_step = step
        log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row, %d in "
                    "total)", step, self.consecutive, self.skipped_total)

    def _read_flags(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                    wait: bool) -> None:
        """Count the device-side verdicts whose steps have run (all of them with ``wait``)."""
        for step, flag, _ in pop_landed(self._pending, wait):
            bad = bool(flag)
            if bad:
                pl_module.ema.uncount()  # that update changed nothing
            self._count(step, bad)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # the counts in the file are complete: read the verdicts still pending (Lightning took
        # this callback's state_dict just before; the module's EMA state comes after this hook)
        self._read_flags(trainer, pl_module, wait=True)
        states = checkpoint.get("callbacks", {})
        if self.state_key in states:
            states[self.state_key] = self.state_dict()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_flags(trainer, pl_module, wait=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._read_flags(trainer, pl_module, wait=False)
        if logging_step(trainer):  # a host number, written as Lightning would write it
            write_to_loggers(trainer, {"train/nonfinite_steps": float(self.skipped_total)},
                             *step_and_epoch(trainer))
        if self.consecutive < self.max_consecutive:
            return
        # at a step boundary: the saved state is that of the last good step
        save_and_flush(trainer, self.checkpoint_path)
        raise NonFiniteTrainingError(
            f"{self.consecutive} consecutive optimizer steps (from step {self._first_bad_step} "
            f"to {self._last_bad_step}) had a non-finite loss or gradient "
            f"(reliability.max_consecutive_nonfinite={self.max_consecutive}). The state of the "
            f"last good step is in {self.checkpoint_path}. Lower optim.lr, raise "
            "lr_scheduler.num_warmup_steps or check the data, then rerun with the same "
            "checkpointing.save_dir to resume from it.")

    def state_dict(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped_total = int(state_dict.get("skipped_total", 0))


# --------------------------------------------------------------------------- RNG states


def collect_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The global random states of this process (CUDA: the current device, if ``device`` is
    a CUDA device)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    # plain types and tensors only: checkpoints stay loadable with torch.load(weights_only=True)
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                   float(cached_gaussian))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather_objects(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


class RNGStates(pl.Callback):
    """Save every rank's RNG states in checkpoints and restore them when training resumes.

    Restoring happens in ``on_train_start``, after Lightning has rebuilt everything, right
    before the first batch. Validation runs between save points in the uninterrupted run but
    not in the resumed one, so it is made RNG-neutral: its states are put back after it.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None
        self._before_validation: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # every rank runs this hook (the file is then written by rank 0): gather all states
        local = collect_rng_state(pl_module.device)
        checkpoint[RNG_STATES_KEY] = _gather_objects(local, trainer.world_size)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(RNG_STATES_KEY)
        if self._pending is None:
            log.warning("the checkpoint has no %r entry (written by an older version): random "
                        "streams such as dropout restart from the seed", RNG_STATES_KEY)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        if len(states) != trainer.world_size:
            log.warning("the checkpoint holds RNG states of %d ranks but this run has %d: "
                        "random streams such as dropout are not continued exactly",
                        len(states), trainer.world_size)
            return
        restore_rng_state(states[trainer.global_rank], pl_module.device)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._before_validation = collect_rng_state(pl_module.device)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._before_validation is not None:
            restore_rng_state(self._before_validation, pl_module.device)
            self._before_validation = None


# --------------------------------------------------------------------------- preemption


def slurm_job_id() -> str | None:
    """The id that ``scontrol requeue`` takes (``<array job>_<task>`` for array jobs)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> bool:
    """Run ``scontrol requeue <job>`` when under SLURM; otherwise log the command. True if the
    job was requeued."""
    job = slurm_job_id()
    if job is None:
        log.info("not running under SLURM (SLURM_JOB_ID unset): no requeue. Under SLURM this "
                 "runs `%s requeue $SLURM_JOB_ID`; to resume here, rerun the same command with "
                 "the same checkpointing.save_dir", REQUEUE_COMMAND)
        return False
    command = [REQUEUE_COMMAND, "requeue", job]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        log.error("`%s` not found on PATH: job %s was not requeued; resubmit it by hand",
                  " ".join(command), job)
        return False
    if result.returncode != 0:
        log.error("`%s` failed (exit %d): %s", " ".join(command), result.returncode,
                  result.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job)
    return True


EXIT_PREEMPTED = 75  # exit status after a checkpoint signal (EX_TEMPFAIL: resume me)
EXIT_INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT), checkpoint written


class Preempted(StepBoundaryStop):
    """Training stopped by a signal at a step boundary, after ``checkpoint_path`` was saved
    (a :class:`monitoring.StepBoundaryStop`: the step's logged values are written)."""

    def __init__(self, signal_name: str, step: int, checkpoint_path: Path) -> None:
        super().__init__(f"stopped by {signal_name} at step {step}; {checkpoint_path} holds the "
                         "resume point")
        self.signal_name, self.step, self.checkpoint_path = signal_name, step, checkpoint_path

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signal_name == "SIGINT" else EXIT_PREEMPTED


class StoppedAtStartup(BaseException):
    """A checkpoint signal or Ctrl-C arrived while the run was starting (before its first
    step): nothing was trained since the last checkpoint, so the process just stops.

    A BaseException, as KeyboardInterrupt: raised from a signal handler, anywhere, it must
    not be caught or re-created by code that handles ``Exception`` (OmegaConf rebuilds those
    with one message argument)."""

    def __init__(self, signal_name: str, requeue: bool) -> None:
        super().__init__(f"stopped by {signal_name} during start-up, before the first step; "
                         "the last checkpoint is the resume point")
        self.signal_name, self.requeue = signal_name, requeue

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signal_name == "SIGINT" else EXIT_PREEMPTED


# Signal dispositions are process-wide: whether the process is in start-up, between
# stop_at_startup() and the first PreemptionHandler.on_train_start.
_starting = threading.Event()


def _on_startup_signal(requeue_signals: tuple[signal.Signals, ...]):
    def handler(signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if _starting.is_set():
            _starting.clear()  # one stop; a second signal meanwhile has its default effect
            raise StoppedAtStartup(sig.name, sig in requeue_signals)
        # after start-up (reached only through a handler chain that kept this one, e.g.
        # Lightning's after fit): the signal's default effect
        if sig == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return handler


@contextlib.contextmanager
def stop_at_startup(signals: tuple[str, ...], requeue_signals: tuple[str, ...] = ()):
    """While a run starts (lock, data, model, restore, Lightning's set-up), ``signals`` raise
    :class:`StoppedAtStartup` at once, so the caller exits with its ``exit_code`` (75, or 130
    for SIGINT) through its cleanup (the run lock is released) instead of being killed (143).
    :class:`PreemptionHandler` ends the start-up at ``on_train_start``; from then on a signal
    saves a checkpoint at the next step boundary. The previous handlers are back on exit."""
    numbers = tuple(dict.fromkeys(signal.Signals[s] for s in signals))  # names checked by resolve_config
    requeue = tuple(signal.Signals[s] for s in requeue_signals)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _on_startup_signal(requeue)
    previous = {sig: signal.signal(sig, handler) for sig in numbers}
    _starting.set()
    try:
        yield
    finally:
        _starting.clear()
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


class PreemptionHandler(pl.Callback):
    """On one of ``signals``: save ``checkpoint_path`` at the next optimizer-step boundary, stop
    training, and requeue the SLURM job if the signal is one of ``requeue_signals``.

    The handler only records the signal; the work happens in ``on_train_batch_end`` once the
    optimizer step has completed, so the checkpoint is an exact resume point. With several
    processes the flags are reduced over ranks on the device and acted on ``SIGNAL_LAG`` steps
    later by every rank at the same step (no host sync per step). Lightning's own
    SIGTERM handling (which would exit without a checkpoint) is replaced while training runs.
    Training then stops by raising :class:`Preempted` out of ``trainer.fit`` (no validation
    pass); ``stopped_by`` names the signal. A second SIGINT raises KeyboardInterrupt at once.
    """

    def __init__(self, checkpoint_path: str | os.PathLike,
                 signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"),
                 requeue_signals: tuple[str, ...] = ("SIGUSR1",)) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.signals = tuple(signal.Signals[s] for s in signals)  # names checked by resolve_config
        self.requeue_signals = tuple(signal.Signals[s] for s in requeue_signals)
        self.received: signal.Signals | None = None
        self.stopped_by: str | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._seen_step = -1
        # multi-process runs: reduced flags per step, read SIGNAL_LAG steps later
        self._pending: collections.deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = \
            collections.deque()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # async-signal context: record only (no logging, no I/O)
        if self.received is None:
            self.received = signal.Signals(signum)
        elif signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            current = signal.getsignal(sig)
            if current != self._on_signal:
                self._previous.setdefault(sig, current)
                signal.signal(sig, self._on_signal)

    def _uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning registered its own handlers (it restores the pre-fit ones at teardown);
        # before this, nothing has been trained since the last checkpoint (stop_at_startup)
        self._install()
        _starting.clear()
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._seen_step:
            return  # inside a gradient-accumulation cycle: not a resume point
        self._seen_step = trainer.global_step
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            verdict = self._reduced_verdict(trainer)
            if verdict is None:
                return
            received, requeue = verdict
        else:
            received = self.received is not None
            requeue = self.received in self.requeue_signals
        if not received:
            return
        name = self.received.name if self.received is not None else "a signal on another rank"
        log.warning("received %s: saving %s at step %d and stopping", name,
                    self.checkpoint_path, trainer.global_step)
        save_and_flush(trainer, self.checkpoint_path)
        if requeue and trainer.is_global_zero:
            requeue_slurm_job()
        self.stopped_by = name
        # leave fit at once: trainer.should_stop would run a validation pass first
        raise Preempted(name, trainer.global_step, self.checkpoint_path)

    def _reduced_verdict(self, trainer: pl.Trainer) -> tuple[bool, bool] | None:
        """(any rank received a signal, any a requeueing one), decided SIGNAL_LAG optimizer
        steps after the flags were reduced, the same step on every rank; None before then.

        The flags are all-reduced on the device each step and copied to pinned memory without
        waiting: reading them at once (one host sync per step) would idle the GPUs while the
        loop's Python runs; SIGNAL_LAG steps later the copy has long completed."""
        device = trainer.strategy.root_device
        flags = torch.stack([
            torch.full((), int(self.received is not None), dtype=torch.int32, device=device),
            torch.full((), int(self.received in self.requeue_signals), dtype=torch.int32,
                       device=device)])
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        self._pending.append((trainer.global_step, *readable_later(flags)))
        step, host, event = self._pending[0]
        if step > trainer.global_step - SIGNAL_LAG:
            return None
        self._pending.popleft()
        if event is not None:
            event.synchronize()
        return bool(host[0]), bool(host[1])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._uninstall()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._uninstall()


class ResplitLoop(pl.Callback):
    """Resume a checkpoint on another split of the same global batch (e.g. 2 GPUs -> 1 GPU with
    accumulation 2): Lightning counts micro-batches of the epoch, and uses that count for the
    accumulation boundaries and the epoch's end, so it is rescaled from the saved accumulation
    to the current one. The data position itself is re-split by the sampler
    (``data.sampler.ResumableDistributedSampler.load_state_dict``)."""

    COUNTERS = ("ready", "started", "processed", "completed")

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        datamodule = trainer.datamodule
        sampler = checkpoint.get(type(datamodule).__qualname__, {}).get("sampler") \
            if datamodule is not None else None
        loops = checkpoint.get("loops", {}).get("fit_loop")
        if sampler is None or loops is None:
            return
        saved, now = int(sampler.get("accumulate", 1)), int(trainer.accumulate_grad_batches)
        if saved == now:
            return
        progress = loops["epoch_loop.batch_progress"]
        for scope in ("total", "current"):
            counts = progress[scope]
            ready = counts["ready"]
            global_batches, within = divmod(ready, saved)  # (global batch, accumulation step)
            if within:
                raise ValueError(f"the checkpoint was written inside an accumulation cycle "
                                 f"({ready} micro-batches, accumulation {saved}); resume it "
                                 "with the same trainer.accumulate_grad_batches")
            scaled = global_batches * now
            for key in self.COUNTERS:  # keep each counter's lag behind `ready`
                counts[key] = scaled - (ready - counts[key])
        log.info("accumulation %d -> %d: Lightning's micro-batch counters rescaled", saved, now)


# --------------------------------------------------------------------------- run directory lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


LOCK_SETTLE_S = 5.0  # how long a refused process waits for a takeover in progress to finish
LOCK_RETRY_S = 0.005  # pause between attempts while the lock file changes hands


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The holder record of an open lock file, or None if it is not one."""
    try:
        record = json.loads(os.pread(fd, 4096, 0))
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int) \
            or not isinstance(record.get("host"), str):
        return None
    return record


def _describe(record: dict[str, Any]) -> str:
    job = record.get("slurm_job")
    return (f"host {record['host']}, pid {record['pid']}) started {record.get('started', '?')}"
            + ("" if job is None else f", SLURM job {job}"))


class RunLock:
    """``<directory>/.lock``: one training process per run directory, for the whole run.

    The holder keeps the file open and ``flock``-ed; the kernel drops that lock when the
    process ends, however it ends. The file holds the holder as one JSON line (host, pid,
    start time, SLURM job) and is complete before any other process can open it: it is
    written and locked under a temporary name, then published by ``link`` (fails if another
    process published first) or, over a file whose lock is free, by ``rename`` while holding
    that file's lock (so one process at a time replaces it). A process that finds the lock
    held is refused with the holder's record.

    A file whose lock is free was left by a holder that is gone. It is taken over (logged)
    when it names this host, or this SLURM job (a requeue, maybe on another node); one left
    from another host is refused, since ``flock`` does not reach across hosts on every file
    system (delete the file if that run is gone).
    """

    NAME = ".lock"

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / self.NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        job = slurm_job_id()
        record = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": job,
                  "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        fd, staged = tempfile.mkstemp(prefix=f"{self.NAME}.", suffix=".tmp", dir=self.path.parent)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else has it
            except OSError as err:
                raise RunLockedError(f"{self.path.parent} does not support file locks (flock: "
                                     f"{err}); use a checkpointing.save_dir on a file system that "
                                     "does") from None
            deadline = time.monotonic() + LOCK_SETTLE_S
            while not self._publish(fd, staged, job, deadline):
                time.sleep(LOCK_RETRY_S)
        except BaseException:
            os.close(fd)
            Path(staged).unlink(missing_ok=True)
            raise
        Path(staged).unlink(missing_ok=True)  # after link(): the second name of the lock file
        self._fd = fd

    def _publish(self, fd: int, staged: str, job: str | None, deadline: float) -> bool:
        """One attempt to make the locked file ``staged`` (open as ``fd``) the lock file:
        True once it is, False to try again (the lock file changed hands meanwhile); raises
        :class:`RunLockedError` if another process holds the lock."""
        try:
            os.link(staged, self.path)
            return True
        except FileExistsError:
            pass
        try:
            other = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False  # released in between
        try:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(other)
                if not _same_file(other, self.path):
                    return False  # replaced in between: read the new holder
                if holder is None:
                    raise RunLockedError(f"{self.path} is held by a process that recorded no "
                                         "holder; if no run uses this directory, delete it") \
                        from None
                here = holder["host"] == socket.gethostname()
                if here and not _pid_alive(holder["pid"]) and time.monotonic() < deadline:
                    return False  # a takeover in progress: its holder appears in a moment
                raise RunLockedError(
                    f"{self.path.parent} is in use by another run ({_describe(holder)}; wait for "
                    "it to end, or use another checkpointing.save_dir") from None
            # the lock is free: the holder of that file is gone
            if not _same_file(other, self.path):
                return False  # replaced or removed since it was opened
            holder = _read_holder(other)
            if holder is None:
                raise RunLockedError(f"{self.path} exists but holds no readable holder record; "
                                     "if no run uses this directory, delete it")
            if job is not None and holder.get("slurm_job") == job:
                log.warning("%s was left by this SLURM job's previous run (host %s, pid %d): "
                            "taking it over", self.path, holder["host"], holder["pid"])
            elif holder["host"] == socket.gethostname():
                log.warning("%s was left by pid %d on this host, which no longer holds it: "
                            "taking it over", self.path, holder["pid"])
            else:
                raise RunLockedError(
                    f"{self.path.parent} has a lock left on another host ({_describe(holder)}, "
                    f"which cannot be checked from here: if that run is gone, delete {self.path}")
            os.rename(staged, self.path)  # while holding the old file's lock: one replacer
            return True
        finally:
            os.close(other)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()  # before the lock drops: a waiter then sees a moved file
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
