"""What the training loop logs without making the host wait for the device: throughput
(``train/tokens_per_s``, ``train/ms_per_step``), the step's logged device values (``LoggedLater``),
a progress bar counting optimizer steps, and for logs nobody watches live a line every
``log_every_n_steps`` steps with the loss curves drawn at each validation (``TrainingReport``).

Wall time per optimizer step is measured between step ends over a window of the last
``window`` optimizer steps, so validation runs, checkpoint stalls and data waits are in it:
the rate a run really gets, comparable with the isolated step of ``bench/train_step.py``.

Lightning writes ``self.log`` values to the loggers every ``log_every_n_steps`` optimizer
steps and converts each device tensor to a Python number there: a host read that waits for
the device to finish its queue, after which the GPU idles while the host launches the next
step. Host numbers are therefore written straight to the loggers at those steps
(``write_to_loggers``), and device values are copied there without waiting and written once
the copy has landed (``LoggedLater``).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the Agg backend

log = logging.getLogger(__name__)


def logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes the training values to the loggers at this batch end: every
    ``log_every_n_steps`` optimizer steps (and when stopping), never inside gradient
    accumulation. Called from ``on_train_batch_end``."""
    return (bool(trainer.loggers) and not trainer.fit_loop._should_accumulate()
            and trainer._logger_connector.should_update_logs)


def step_and_epoch(trainer: pl.Trainer) -> tuple[int, int]:
    """The step and epoch Lightning writes with the values logged at this batch end."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped, trainer.current_epoch


def write_to_loggers(trainer: pl.Trainer, metrics: dict[str, float], step: int,
                     epoch: int) -> None:
    """Write host numbers to every logger as Lightning's logger connector writes a step's
    values (with the epoch, then each logger's save)."""
    for logger in trainer.loggers:
        logger.log_metrics({**metrics, "epoch": epoch}, step=step)
        logger.save()


def readable_later(value: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A copy of a device tensor that the host can read once the returned event has completed
    (pinned memory, copied without waiting); a CPU tensor as it is, no event."""
    if value.device.type != "cuda":
        return value, None
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    host.copy_(value, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def copy_logged(metrics: dict, keys: tuple[str, ...]) -> tuple | None:
    """``(names, host copy, event)``: the values of those ``keys`` in ``metrics`` (device or
    CPU tensors, or numbers), stacked in float64 (exact for them) and copied without waiting
    (``readable_later``); None when none of the keys is there."""
    names = tuple(k for k in keys if k in metrics)
    if not names:
        return None
    values = torch.stack([torch.as_tensor(metrics[k]).detach().double() for k in names])
    return (names, *readable_later(values))


def landed_values(names: tuple[str, ...], host: torch.Tensor) -> dict[str, float]:
    """The numbers of a landed ``copy_logged`` copy, by name."""
    return {k: float(v) for k, v in zip(names, host)}


def pop_landed(pending: collections.deque, wait: bool) -> Iterator[tuple]:
    """Pop and yield, oldest first, the entries ``(..., host copy, event)`` of ``pending``
    (copies from ``readable_later``) whose copy has landed; with ``wait`` all of them,
    waiting for each. Stops at the first still in flight."""
    while pending:
        event = pending[0][-1]
        if event is not None:
            if not wait and not event.query():
                return
            event.synchronize()
        yield pending.popleft()


class Throughput(pl.Callback):
    """Logs the training rate: tokens per second and milliseconds per optimizer step.

    ``tokens_per_step``: tokens of one global batch (``loader.global_batch_size`` x
    ``model.length``), so the rate counts all devices. Written at Lightning's logging steps
    once ``window`` optimizer steps have ended (start-up and compilation are left out)."""

    def __init__(self, tokens_per_step: int, window: int = 50) -> None:
        if window < 1:
            raise ValueError(f"window={window}: must be >= 1 optimizer steps")
        self.tokens_per_step = int(tokens_per_step)
        self.window = window
        self._ends: collections.deque[tuple[float, int]] = collections.deque(maxlen=window + 1)
        self._last_step: int | None = None  # the step count at the last recorded step end

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # a micro-batch inside gradient accumulation: no optimizer step has ended
        self._last_step = step
        self._ends.append((time.perf_counter(), step))
        if len(self._ends) <= self.window or not logging_step(trainer):
            return
        (t0, s0), (t1, s1) = self._ends[0], self._ends[-1]
        seconds_per_step = (t1 - t0) / (s1 - s0)
        write_to_loggers(trainer, {"train/tokens_per_s": self.tokens_per_step / seconds_per_step,
                                   "train/ms_per_step": 1e3 * seconds_per_step},
                         *step_and_epoch(trainer))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ends.clear()  # a resumed run starts a new window
        self._last_step = trainer.global_step


class StepBoundaryStop(Exception):
    """Raised from ``on_train_batch_end`` to end training after the step's optimizer update
    (a preemption, reliability.Preempted): the step's logged values are final, and
    :class:`LoggedLater` writes them before the run ends."""


class LoggedLater(pl.Callback):
    """Writes the training step's logged device values of ``keys`` (logged with
    ``logger=False``) to the loggers without a host wait: at each of Lightning's logging
    steps they are copied without waiting (``readable_later``) and written, with the step
    and epoch Lightning would have written, once the copy has landed (on a GPU a step or two
    later, on the CPU at once); the copies still in flight are written at the end of
    training, before a validation run and when the run fails. A :class:`StepBoundaryStop`
    raised by a callback before this one's ``on_train_batch_end`` still gets that step's
    values written: every logged step up to the stop is in the logs."""

    def __init__(self, keys: tuple[str, ...] = ("train/loss",)) -> None:
        self.keys = tuple(keys)
        # (step, epoch, names, host copy, event) per logging step, oldest first
        self._pending: collections.deque[tuple] = collections.deque()
        self._copied_step: int | None = None  # the logger step of the latest copy

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._copy_step(trainer)
        self._write(trainer, wait=False)

    def _copy_step(self, trainer: pl.Trainer) -> None:
        """Copy this batch end's values of ``keys`` if Lightning logs at it (once per step)."""
        step, epoch = step_and_epoch(trainer)
        if not logging_step(trainer) or step == self._copied_step:
            return
        copied = copy_logged(trainer.callback_metrics, self.keys)
        if copied is not None:
            self._pending.append((step, epoch, *copied))
            self._copied_step = step

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, wait=True)  # validation reads its own values on the host anyway

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, wait=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        try:
            if isinstance(exception, StepBoundaryStop):  # the step ended: its values are final
                self._copy_step(trainer)
            self._write(trainer, wait=True)
        except Exception as error:  # a failed device may not give its values back
            log.warning("training values of %d logging steps not written: %s",
                        len(self._pending), error)

    def _write(self, trainer: pl.Trainer, wait: bool) -> None:
        """Write the pending copies in step order, up to the first still in flight."""
        for step, epoch, names, host, _ in pop_landed(self._pending, wait):
            write_to_loggers(trainer, landed_values(names, host), step, epoch)


class _MetricsEveryNSteps:
    """Progress-bar mixin: during training, the values of ``keys`` (logged without
    ``prog_bar``, e.g. ``train/loss``) are copied from the trainer's callback metrics every
    ``every_n_steps`` optimizer steps, without waiting (``readable_later``), and shown once
    the copy has landed: on a GPU the bar shows a value up to ~2 x ``every_n_steps`` steps
    old, and never makes the host wait for the device.

    A host read of a device value waits for the device to finish its queue, and the GPU
    then idles while the host launches the next step (~10 ms/step at DiT small,
    bench/trace_loop.py). Lightning converts every ``prog_bar=True`` value at each batch
    end, whatever the bar shows, so the training loss is logged without it and shown from
    here. The step counter and speed move every step; validation reads as usual."""

    def __init__(self, every_n_steps: int, keys: tuple[str, ...] = (), **kwargs: Any) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: must be >= 1")
        super().__init__(**kwargs)
        self.every_n_steps, self.keys = every_n_steps, tuple(keys)
        self._shown: dict | None = None
        self._copies: collections.deque[tuple] = collections.deque()  # (names, host, event)
        self._next_copy = 0

    def _show_landed(self) -> None:
        """Show the copy once it has landed (CPU values: at once)."""
        for names, host, _ in pop_landed(self._copies, wait=False):
            self._shown.update(landed_values(names, host))

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        if not trainer.training:
            return super().get_metrics(trainer, pl_module)
        self._show_landed()
        step = trainer.global_step
        if self._shown is None or (step >= self._next_copy and not self._copies):
            # the bar's other entries (any prog_bar value) as Lightning gives them, less the
            # logger's version number (v_num: a CSV directory's index, not the run), with the
            # values of ``keys`` last shown
            kept = {k: v for k, v in (self._shown or {}).items() if k in self.keys}
            given = {k: v for k, v in super().get_metrics(trainer, pl_module).items()
                     if k != "v_num"}
            self._shown = {**given, **kept}
            copied = copy_logged(trainer.callback_metrics, self.keys)
            if copied is not None:
                self._copies.append(copied)
            self._next_copy = step + self.every_n_steps
            self._show_landed()
        return {**self._shown, "step": step_fraction(trainer)}

    @property
    def total_train_batches(self) -> int | float:
        """The bar's total, in what it counts (micro-batches): this epoch's, or those left to
        ``max_steps``, whichever is fewer. Lightning bounds it by the optimizer steps left,
        so with gradient accumulation the bar ran to 16,000 of "1,000"."""
        trainer = self.trainer
        total = trainer.num_training_batches
        if trainer.max_steps is not None and trainer.max_steps > 0:
            left = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            return min(total, left)
        return total

    def _get_train_description(self, current_epoch: int) -> str:
        """The Rich bar's label: training runs to ``max_steps`` (the step is in the metrics),
        so no epoch count (Lightning's ``Epoch 0/-2`` when ``max_epochs`` is unset)."""
        return f"{'Training':{len(self.validation_description)}}"


def process_start_time() -> float | None:
    """Wall-clock time (``time.time()`` scale) at which this process started, from Linux's
    /proc (the process's start in clock ticks after boot); None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - started_after_boot)


def step_fraction(trainer: pl.Trainer) -> str:
    """``step/max_steps`` of the trainer now."""
    return step_fraction_of(trainer.global_step, trainer.max_steps)


def format_duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def plot_training_curves(train: list[tuple[int, float]], val: list[tuple[int, float]],
                         path: Path, title: str) -> None:
    """Training loss (the logged steps) and validation loss against the optimizer step."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train/loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), marker="o", label="val/loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


class TrainingReport(pl.Callback):
    """For logs nobody watches live (SLURM, nohup, ``| tee``): a log line every
    ``every_n_steps`` optimizer steps with ``step/max_steps``, the training loss, tokens per
    second and the ETA; and the loss curves as a PNG (``curves_path``) after each validation
    and at the end of training. Rank 0 only.

    The loss is copied without waiting (``readable_later``) and the line written once the copy
    has landed, so the host never waits for the device. Tokens per second and the ETA use the
    wall time since training started (validation and checkpoint stalls included).

    Once, at the first optimizer step: how long the process took to get there (``started``:
    its start, ``process_start_time()``), which is what compilation costs a run; at the end,
    the rate of the steps after it (compilation excluded, validation and checkpoints included:
    what the run's remaining steps cost). The curves'
    points travel in the checkpoint (``state_dict``), so a resumed run's plot starts at step 0."""

    def __init__(self, every_n_steps: int, tokens_per_step: int, curves_path: str | Path,
                 title: str = "training", started: float | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: must be >= 1")
        self.every_n_steps, self.tokens_per_step = every_n_steps, int(tokens_per_step)
        self.curves_path, self.title = Path(curves_path), title
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self._pending: collections.deque[tuple] = collections.deque()
        self._start: tuple[float, int] = (time.perf_counter(), 0)
        self._last_step: int | None = None
        self._started, self._first_logged = started, False
        self._after_first: tuple[float, int] | None = None  # (time, step) at the first step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = (time.perf_counter(), trainer.global_step)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step != self._last_step and not self._first_logged and trainer.is_global_zero:
            self._log_first_step(step, pl_module.device)
        if step != self._last_step and step % self.every_n_steps == 0 and trainer.is_global_zero:
            copied = copy_logged(trainer.callback_metrics, ("train/loss",))
            if copied is not None:
                self._pending.append((step, time.perf_counter(), *copied))
        self._last_step = step
        self._report(trainer, wait=False)

    def state_dict(self) -> dict[str, Any]:
        """The loss curves so far, saved in the checkpoint: a resumed run draws them whole."""
        return {"train": [list(point) for point in self.train],
                "val": [list(point) for point in self.val]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train = [(int(step), float(loss)) for step, loss in state_dict.get("train", [])]
        self.val = [(int(step), float(loss)) for step, loss in state_dict.get("val", [])]

    def _log_first_step(self, step: int, device: torch.device) -> None:
        """Once per process: when this process's first optimizer step ended, counted from the
        process's start (``started``, wall clock) and from the start of training; the step's
        kernels are waited for (one sync)."""
        self._first_logged = True
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self._after_first = (now, step)
        since_start = ("" if self._started is None
                       else f"{time.time() - self._started:.2f} s after the process started, ")
        log.info("first optimizer step (step %d) done %s%.2f s after training started "
                 "(start-up, compilation and the first step's micro-batches)", step,
                 since_start, now - self._start[0])

    def _report(self, trainer: pl.Trainer, wait: bool) -> None:
        t0, s0 = self._start
        for step, now, names, host, _ in pop_landed(self._pending, wait):
            loss = landed_values(names, host)["train/loss"]
            self.train.append((step, loss))
            rate = (step - s0) / max(now - t0, 1e-9)  # optimizer steps per second
            eta = ((trainer.max_steps - step) / rate if rate > 0 and trainer.max_steps > 0
                   else float("nan"))
            log.info("step %s  loss %.4f  %.0f tokens/s  ETA %s", step_fraction_of(
                step, trainer.max_steps), loss, rate * self.tokens_per_step,
                format_duration(eta) if eta == eta else "?")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        value = trainer.callback_metrics.get("val/loss")
        if value is not None:
            self.val.append((trainer.global_step, float(value)))
        self._report(trainer, wait=True)
        self.write_curves()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._report(trainer, wait=True)
        self._log_steady_rate(trainer.global_step, pl_module.device)
        self.write_curves()
        log.info("loss curves: %s", self.curves_path)

    def _log_steady_rate(self, step: int, device: torch.device) -> None:
        """Once, at the end: the optimizer steps after the first one, their wall time and
        tokens per second (one sync, so the last step's kernels are counted)."""
        if self._after_first is None or step <= self._after_first[1]:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds, steps = time.perf_counter() - self._after_first[0], step - self._after_first[1]
        log.info("after the first step: %d optimizer step%s in %.2f s (%.1f ms per step, %.0f "
                 "tokens/s)", steps, "" if steps == 1 else "s", seconds, 1e3 * seconds / steps,
                 steps * self.tokens_per_step / max(seconds, 1e-9))

    def write_curves(self) -> None:
        plot_training_curves(self.train, self.val, self.curves_path, self.title)


def step_fraction_of(step: int, max_steps: int) -> str:
    """``step/max_steps`` (just the step when ``max_steps`` is unset)."""
    return f"{step}/{max_steps}" if max_steps and max_steps > 0 else str(step)


def progress_bar(every_n_steps: int, keys: tuple[str, ...] = ("train/loss",)) -> pl.Callback:
    """The bar Lightning would pick (Rich when ``rich`` is installed, else tqdm), showing
    ``keys`` of the logged values, copied every ``every_n_steps`` optimizer steps without a
    device sync (``_MetricsEveryNSteps``)."""
    try:
        import rich  # noqa: F401  - an optional package: Lightning's Rich bar needs it
        base = RichProgressBar
    except ImportError:
        base = TQDMProgressBar
    bar = type(f"Step{base.__name__}", (_MetricsEveryNSteps, base), {})
    return bar(every_n_steps, keys)
