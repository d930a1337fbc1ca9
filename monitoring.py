"""Throughput in the training logs (``train/tokens_per_s``, ``train/ms_per_step``) and a
progress bar that does not stall the step.

Wall time per optimizer step, measured between step ends over a window of the last
``window`` optimizer steps, so validation runs, checkpoint stalls and data waits are in it:
the rate a run really gets, comparable with the isolated step of ``bench/train_step.py``.
Values are logged as device tensors made by a fill (``device_scalar``), never copied from
the host, so logging them adds no host-device synchronisation to the step.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import pytorch_lightning as pl
import torch


def device_scalar(value: float, device: torch.device) -> torch.Tensor:
    """A 0-d float tensor on ``device`` filled with ``value``: a fill kernel, whereas
    ``torch.tensor(value, device=...)`` (what ``LightningModule.log`` does with a Python number)
    is a copy from pageable host memory, which waits for the device to finish its queue."""
    return torch.full((), float(value), device=device)


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


class Throughput(pl.Callback):
    """Logs the training rate: tokens per second and milliseconds per optimizer step.

    ``tokens_per_step``: tokens of one global batch (``loader.global_batch_size`` x
    ``model.length``), so the rate counts all devices. The first value appears once
    ``window`` optimizer steps have ended (start-up and compilation are left out of it)."""

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
        if len(self._ends) <= self.window:
            return
        (t0, s0), (t1, s1) = self._ends[0], self._ends[-1]
        seconds_per_step = (t1 - t0) / (s1 - s0)
        pl_module.log("train/tokens_per_s",
                      device_scalar(self.tokens_per_step / seconds_per_step, pl_module.device))
        pl_module.log("train/ms_per_step",
                      device_scalar(1e3 * seconds_per_step, pl_module.device))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ends.clear()  # a resumed run starts a new window
        self._last_step = trainer.global_step


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
        self._copies: dict[str, tuple[torch.Tensor, Any]] = {}
        self._next_copy = 0

    def _show_landed(self) -> None:
        """Show the copies once all have landed (CPU values: at once)."""
        if self._copies and all(e is None or e.query() for _, e in self._copies.values()):
            self._shown.update({k: float(host) for k, (host, _) in self._copies.items()})
            self._copies = {}

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        if not trainer.training:
            return super().get_metrics(trainer, pl_module)
        self._show_landed()
        step = trainer.global_step
        if self._shown is None or (step >= self._next_copy and not self._copies):
            # the bar's other entries (the run's version, any prog_bar value) as Lightning
            # gives them, with the values of ``keys`` last shown
            kept = {k: v for k, v in (self._shown or {}).items() if k in self.keys}
            self._shown = {**super().get_metrics(trainer, pl_module), **kept}
            logged = trainer.callback_metrics
            self._copies = {k: readable_later(torch.as_tensor(logged[k]).detach())
                            for k in self.keys if k in logged}
            self._next_copy = step + self.every_n_steps
            self._show_landed()
        return self._shown


def progress_bar(every_n_steps: int, keys: tuple[str, ...] = ("train/loss",)) -> pl.Callback:
    """The bar Lightning would pick (Rich when ``rich`` is installed, else tqdm), showing
    ``keys`` of the logged values, copied every ``every_n_steps`` optimizer steps without a
    device sync (``_MetricsEveryNSteps``)."""
    from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

    try:
        import rich  # noqa: F401
        base = RichProgressBar
    except ImportError:
        base = TQDMProgressBar
    bar = type(f"Step{base.__name__}", (_MetricsEveryNSteps, base), {})
    return bar(every_n_steps, keys)
