"""The throughput callback against a clock whose readings are known."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

import monitoring


class Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.logged: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        metrics = self.trainer.callback_metrics
        if "train/ms_per_step" in metrics:
            self.logged.append({"step": self.trainer.global_step,
                                **{k: float(metrics[k]) for k in
                                   ("train/ms_per_step", "train/tokens_per_s")}})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_throughput_is_wall_time_per_optimizer_step(monkeypatch, accumulate):
    # each reading of the clock advances it by 0.25 s: only optimizer-step ends read it, so a
    # step is 250 ms whatever the accumulation, and 64 tokens per step make 256 tokens/s
    readings = iter(0.25 * k for k in range(10_000))
    monkeypatch.setattr(monitoring.time, "perf_counter", lambda: next(readings))
    module, window, steps = Linear(), 4, 12
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accumulate_grad_batches=accumulate,
                         callbacks=[monitoring.Throughput(tokens_per_step=64, window=window)])
    data = TensorDataset(torch.randn(steps * accumulate * 2, 4))
    trainer.fit(module, DataLoader(data, batch_size=2))
    # the first value once `window` steps have ended after the first step's end
    assert module.logged[0]["step"] == window + 1
    assert len({round(v["train/ms_per_step"], 9) for v in module.logged}) == 1
    assert module.logged[-1]["train/ms_per_step"] == pytest.approx(250.0)
    assert module.logged[-1]["train/tokens_per_s"] == pytest.approx(256.0)


def test_device_scalar_is_the_value():
    value = monitoring.device_scalar(3.5, torch.device("cpu"))
    assert value.shape == () and value.dtype == torch.float32 and float(value) == 3.5
    with pytest.raises(ValueError, match="window"):
        monitoring.Throughput(10, window=0)


class _CountingTrainer:
    """What a progress bar's get_metrics reads of the trainer; counts the host reads of the
    logged device values (each one waits for the device)."""

    def __init__(self) -> None:
        self.training, self.global_step, self.loggers, self.reads = True, 0, [], 0
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
    shown = []
    for step in range(25):
        trainer.global_step = step
        for _ in range(2):  # refreshes within one step read nothing new
            metrics = bar.get_metrics(trainer, None)
            shown.append(metrics["train/loss"])
            assert "val/other" not in metrics  # only the keys asked for
    assert trainer.reads == 3  # steps 0, 10 and 20
    assert shown[::2] == [float(10 * (s // 10)) for s in range(25)]
    trainer.training = False  # validation: Lightning's own reading, every refresh
    trainer.progress_bar_metrics = {"val/loss": 1.5}
    assert bar.get_metrics(trainer, None)["val/loss"] == 1.5
    with pytest.raises(ValueError, match="every_n_steps=0"):
        monitoring.progress_bar(0)
