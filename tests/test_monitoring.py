"""Throughput, the values written to the loggers later, and the progress bar."""

from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from runtime import monitoring
from tests.helpers import RecordingLogger


class Linear(pl.LightningModule):
    def __init__(self, log_loss: str = "none"):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.log_loss = log_loss

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        if self.log_loss != "none":  # "lightning": Lightning writes it; "later": LoggedLater
            self.log("train/loss", loss, logger=self.log_loss == "lightning")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module, steps, accumulate=1, every=1, callbacks=()):
    logger = RecordingLogger()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger,
                         log_every_n_steps=every, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accumulate_grad_batches=accumulate, callbacks=list(callbacks))
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(steps * accumulate * 2, 4))
    trainer.fit(module, DataLoader(data, batch_size=2))
    return logger


@pytest.mark.parametrize("accumulate", [1, 3])
def test_throughput_is_wall_time_per_optimizer_step(monkeypatch, accumulate):
    # each reading of the clock advances it by 0.25 s: only optimizer-step ends read it, so a
    # step is 250 ms whatever the accumulation, and 64 tokens per step make 256 tokens/s
    readings = iter(0.25 * k for k in range(10_000))
    monkeypatch.setattr(monitoring.time, "perf_counter", lambda: next(readings))
    window, steps = 4, 12
    logger = fit(Linear(), steps, accumulate,
                 callbacks=[monitoring.Throughput(tokens_per_step=64, window=window)])
    ms, rate = logger.values("train/ms_per_step"), logger.values("train/tokens_per_s")
    # the first value once `window` steps have ended after the first step's end; Lightning
    # numbers the rows from 0 (the step count before the increment)
    assert ms[0][0] == window and [s for s, _ in ms] == list(range(window, steps))
    assert {round(v, 9) for _, v in ms} == {250.0} and {round(v, 9) for _, v in rate} == {256.0}
    with pytest.raises(ValueError, match="window"):
        monitoring.Throughput(10, window=0)


class LateEvent:
    """A copy's event that completes only after ``lands_after`` queries (a busy GPU)."""

    def __init__(self, lands_after):
        self.left = lands_after

    def query(self):
        self.left -= 1
        return self.left < 0

    def synchronize(self):
        self.left = -1


@pytest.mark.parametrize("accumulate,every,lands_after", [(1, 1, 0), (1, 3, 0), (2, 2, 0),
                                                          (1, 1, 3), (2, 3, 5)])
def test_logged_later_writes_what_lightning_writes(monkeypatch, accumulate, every, lands_after):
    """The same values at the same steps and epochs as Lightning's own writing (a second code
    path), also when each copy lands only some batches later; none left at the end."""
    lightning = fit(Linear("lightning"), 10, accumulate, every)
    if lands_after:
        monkeypatch.setattr(monitoring, "readable_later",
                            lambda value: (value.clone(), LateEvent(lands_after)))
    later = fit(Linear("later"), 10, accumulate, every, [monitoring.LoggedLater(("train/loss",))])
    rows = [(s, m) for s, m in lightning.rows if "train/loss" in m]
    assert len(rows) >= 3
    assert [(s, m) for s, m in later.rows if "train/loss" in m] == rows


def test_logged_later_writes_in_flight_copies_before_validation_and_on_failure(monkeypatch):
    monkeypatch.setattr(monitoring, "readable_later",
                        lambda value: (value.clone(), LateEvent(10**6)))  # never lands alone
    callback, logger = monitoring.LoggedLater(("train/loss",)), RecordingLogger()

    class Trainer:
        loggers = [logger]

    callback._pending.append((4, 0, *monitoring.copy_logged({"train/loss": torch.tensor(2.5)},
                                                            callback.keys)))
    callback._write(Trainer, wait=False)
    assert logger.rows == []
    callback.on_validation_start(Trainer, None)
    assert logger.rows == [(4, {"train/loss": 2.5, "epoch": 0})]
    callback._pending.append((9, 1, *monitoring.copy_logged({"train/loss": torch.tensor(1.0)},
                                                            callback.keys)))
    callback.on_exception(Trainer, None, RuntimeError("crash"))
    assert logger.rows[-1] == (9, {"train/loss": 1.0, "epoch": 1})


class _CountingTrainer:
    """What a progress bar's get_metrics reads of the trainer; counts the host reads of the
    logged device values (each one waits for the device)."""

    def __init__(self) -> None:
        self.training, self.global_step, self.loggers, self.reads = True, 0, [], 0
        self.max_steps = 25
        self.progress_bar_metrics: dict = {}

    @property
    def callback_metrics(self) -> dict:
        trainer = self

        class Logged(torch.Tensor):
            def __float__(self):
                trainer.reads += 1
                return super().__float__()

        return {"train/loss": torch.tensor(float(self.global_step)).as_subclass(Logged),
                "val/other": torch.tensor(0.0)}


def test_progress_bar_reads_logged_values_every_n_steps_in_training():
    bar = monitoring.progress_bar(10)
    trainer = _CountingTrainer()
    trainer.loggers = [SimpleNamespace(version=7)]  # Lightning would show it as v_num
    shown = []
    for step in range(25):
        trainer.global_step = step
        for _ in range(2):  # refreshes within one step read nothing new
            metrics = bar.get_metrics(trainer, None)
            shown.append(metrics["train/loss"])
            assert "val/other" not in metrics  # only the keys asked for
            assert "v_num" not in metrics
            assert metrics["step"] == f"{step}/25"  # the bar counts optimizer steps
    assert trainer.reads == 3  # steps 0, 10 and 20
    assert shown[::2] == [float(10 * (s // 10)) for s in range(25)]
    trainer.training = False  # validation: Lightning's own reading, every refresh
    trainer.progress_bar_metrics = {"val/loss": 1.5}
    assert bar.get_metrics(trainer, None)["val/loss"] == 1.5
    with pytest.raises(ValueError, match="every_n_steps=0"):
        monitoring.progress_bar(0)
