"""Non-finite steps are skipped and counted, too many stop the run with the last good state;
RNG states round-trip; bad configurations fail before any training with clear messages."""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import shlex
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

import algo
from runtime import reliability
from runtime.checkpointing import AtomicCheckpointIO, load_checkpoint_file
from runtime.config import ConfigError, resolve_config
from tests.helpers import RecordingLogger, compose_config

VOCAB, LENGTH = 16, 8


class RandomTokens(Dataset):
    def __init__(self, n: int) -> None:
        self.data = torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long)}


class NaNGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class FaultyFLM(algo.FLM):
    """FLM whose loss is NaN (``nan_loss_steps``) or whose gradients are NaN (``nan_grad_steps``)."""

    nan_loss_steps: set[int] = set()
    nan_grad_steps: set[int] = set()

    def compute_loss(self, batch, step, batch_idx):
        loss = super().compute_loss(batch, step, batch_idx)
        if step in self.nan_loss_steps:
            return loss * float("nan")
        if step in self.nan_grad_steps:
            return NaNGradient.apply(loss)
        return loss


class Snapshots(pl.Callback):
    """Backbone and EMA after every optimizer step, keyed by the step that produced them."""

    def __init__(self):
        self.params, self.ema = {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.params[step] = {k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()}
        self.ema[step] = {k: v.clone() for k, v in pl_module.ema.shadow.items()}


def fit(tmp_path, nan_loss=(), nan_grad=(), max_steps=8, max_consecutive=3, accumulate=2,
        fused="false"):
    """``fused``: optim.fused; "true" runs the fused AdamW, whose steps the guard skips on the
    device (found_inf), the path taken on CUDA; "false" the host-side skip."""
    config = resolve_config(compose_config(
        ["model.length=8", "model.hidden_size=16", "model.n_heads=2", "model.n_blocks=1",
         "model.cond_dim=16", "loader.global_batch_size=8", "training.ema=0.5",
         "lr_scheduler.num_warmup_steps=0", "optim.lr=1e-2", f"optim.fused={fused}"],
        run_dir=str(tmp_path)))
    pl.seed_everything(0)
    module = FaultyFLM(config, vocab_size=VOCAB)
    module.nan_loss_steps, module.nan_grad_steps = set(nan_loss), set(nan_grad)
    guard = reliability.NonFiniteGuard(max_consecutive, tmp_path / "last.ckpt")
    snaps = Snapshots()
    logger = RecordingLogger()
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger,
                         log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=1.0, accumulate_grad_batches=accumulate,
                         callbacks=[guard, snaps])
    loader = DataLoader(RandomTokens(256), batch_size=4)
    try:
        trainer.fit(module, loader)
    finally:
        logged = logger.values("train/nonfinite_steps")
        guard_state = (guard.skipped_total, logged[-1][1] if logged else None)
    return module, snaps, guard_state


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fused", ["false", "true"])
def test_nonfinite_loss_and_gradient_steps_are_skipped(tmp_path, fused):
    module, snaps, (skipped, logged) = fit(tmp_path, nan_loss={3}, nan_grad={5}, fused=fused)
    for step in range(1, 8):
        unchanged = _equal(snaps.params[step], snaps.params[step - 1])
        assert unchanged == (step in (3, 5)), step  # parameters and optimizer untouched
        assert _equal(snaps.ema[step], snaps.ema[step - 1]) == (step in (3, 5)), step
        assert all(torch.isfinite(v).all() for v in snaps.params[step].values())
    assert skipped == 2 and float(logged) == 2.0
    assert module.ema.num_updates == 8 - 2  # the skipped steps are not counted as updates
    optimizer = module.trainer.optimizers[0]
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert steps == {8 - 2}  # nor as optimizer steps (Adam's bias correction)
    # the same run without the faults, minus its steps 3 and 5, is not what we compare with
    # (their noise differs); instead: the optimizer moments are finite and were updated
    assert all(torch.isfinite(state["exp_avg"]).all() for state in optimizer.state.values())


def test_device_side_skip_runs_on_a_fused_optimizer_only(tmp_path):
    """The fused run took the device path (found_inf handed to the optimizer); the unfused
    one the host path; both end in the same parameters (same draws, same skipped steps)."""
    fused, _, _ = fit(tmp_path / "fused", nan_grad={2}, max_steps=4, fused="true")
    plain, _, _ = fit(tmp_path / "plain", nan_grad={2}, max_steps=4, fused="false")
    assert hasattr(fused.trainer.optimizers[0], "found_inf")
    assert not hasattr(plain.trainer.optimizers[0], "found_inf")
    for (name, a), b in zip(fused.backbone.state_dict().items(),
                            plain.backbone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("fused", ["false", "true"])
def test_too_many_nonfinite_steps_stop_with_last_good_state(tmp_path, fused):
    with pytest.raises(reliability.NonFiniteTrainingError,
                       match=r"3 consecutive optimizer steps \(from step 2 to 4\).*max_consecutive"
                             r"_nonfinite=3.*last.ckpt"):
        fit(tmp_path, nan_loss={2, 3, 4, 5, 6, 7}, max_consecutive=3, fused=fused)
    saved = load_checkpoint_file(tmp_path / "last.ckpt")
    assert saved["global_step"] == 5
    # the last good state is that after step 1; rebuild it with the same seed to compare
    _, snaps, _ = fit(tmp_path / "again", max_steps=2, fused=fused)
    for key, value in snaps.params[1].items():
        assert torch.equal(saved["state_dict"][f"backbone.{key}"], value), key


class SignalAt(pl.Callback):
    """Send ``sig`` to this process after optimizer step ``step``; count validation passes."""

    def __init__(self, sig: signal.Signals, step: int) -> None:
        self.sig, self.step, self.validations = sig, step, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)

    def on_validation_start(self, trainer, pl_module):
        self.validations.append(trainer.global_step)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, reliability.EXIT_PREEMPTED),
                                       (signal.SIGINT, reliability.EXIT_INTERRUPTED)])
def test_signal_saves_at_the_step_boundary_and_stops_without_validation(tmp_path, sig, code):
    """Validation runs after every step; the signal's step is checkpointed and training leaves
    at once (Preempted), with no validation pass after the checkpoint."""
    config = resolve_config(compose_config(
        ["model.length=8", "model.hidden_size=16", "model.n_heads=2", "model.n_blocks=1",
         "model.cond_dim=16", "loader.global_batch_size=8"], run_dir=str(tmp_path)))
    pl.seed_everything(0)
    module = algo.FLM(config, vocab_size=VOCAB)
    last = tmp_path / "last.ckpt"
    handler = reliability.PreemptionHandler(last, ("SIGTERM", "SIGINT"), ())
    sender = SignalAt(sig, 3)
    trainer = pl.Trainer(max_steps=50, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, val_check_interval=1,
                         check_val_every_n_epoch=None, limit_val_batches=1,
                         num_sanity_val_steps=0, callbacks=[sender, handler],
                         plugins=[AtomicCheckpointIO()])
    loader = DataLoader(RandomTokens(256), batch_size=8)
    # the handlers the session started with: SIGINT is ignored, not Python's default, in a
    # process started in the background (nohup, `&` in a script), as some CI runners do
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(reliability.Preempted) as stop:
        trainer.fit(module, loader, loader)
    assert stop.value.exit_code == code and stop.value.signal_name == sig.name
    assert load_checkpoint_file(last)["global_step"] == 3  # the signal's step boundary
    assert sender.validations == [1, 2]  # none after the step-3 checkpoint
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored


def test_rng_state_round_trip():
    torch.manual_seed(1)
    state = reliability.collect_rng_state(torch.device("cpu"))
    first = (random.random(), np.random.rand(), torch.rand(3))
    reliability.restore_rng_state(state, torch.device("cpu"))
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_requeue_without_slurm_only_logs(monkeypatch, caplog):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    with caplog.at_level(logging.INFO):
        assert reliability.requeue_slurm_job() is False
    assert "scontrol requeue $SLURM_JOB_ID" in caplog.text
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert reliability.slurm_job_id() == "70_3"


@pytest.mark.parametrize("overrides, message", [
    (["strategy.name=deepspeed"], "strategy='deepspeed' is unknown"),
    (["strategy=fsdp", "algo=flm_distill_second", "algo.teacher_f_path=/x", "algo.teacher_g_path=/y"],
     "strategy=fsdp supports algo=flm, not algo=flm_distill_second"),
    (["algo=flm_distill", "algo.teacher_path=/nonexistent/teacher.ckpt"],
     "algo.teacher_path=/nonexistent"),
    (["+algo.teacher_path=/x.ckpt"], "algo.teacher_path is set but algo=flm does not read it"),
    (["loader.global_batch_size=10", "loader.batch_size=4"], "not divisible by"),
    (["reliability.max_consecutive_nonfinite=0"], "max_consecutive_nonfinite=0"),
    (["reliability.checkpoint_signals=[SIGFOO]"], "unknown signal names \\['SIGFOO'\\]"),
    (["reliability.checkpoint_signals=[SIGTERM]"], "requeue_signals \\['SIGUSR1', 'SIGUSR2'\\] must also"),
    (["callbacks.checkpoint_last.every_n_train_steps=10000"], "make them differ"),
    (["loader.batch_size=0"], "loader.batch_size=0: must be a positive"),
    (["loader.global_batch_size=0"], "loader.global_batch_size=0: must be a positive"),
    (["loader.global_batch_size=-8"], "loader.global_batch_size=-8: must be a positive"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval=0: give a positive"),
    (["trainer.val_check_interval=1.5"], "trainer.val_check_interval=1.5"),
    (["optim.lr=0"], "optim.lr=0: the learning rate must be > 0"),
    (["optim.lr=-1e-4"], "optim.lr=-0.0001"),
    (["trainer.max_steps=-1"], "trainer.max_steps=-1: must be >= 0"),
    (["lr_scheduler.num_warmup_steps=-5"], "lr_scheduler.num_warmup_steps=-5: must be >= 0"),
])
def test_bad_configs_fail_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        algo.resolve_config(compose_config(overrides))


# --------------------------------------------------------------------------- SLURM dry runs

REPO = Path(__file__).resolve().parents[1]


def _render_module():
    spec = importlib.util.spec_from_file_location("slurm_render", REPO / "scripts/slurm/render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main_overrides(command: list[str]) -> list[str]:
    return command[command.index("main") + 1:]


def test_sbatch_template_renders_a_valid_command(capsys, tmp_path):
    _render_module().main(["--nodes", "2", "--data-dir", "/data", "--save-root", "/runs",
                           "trainer.log_every_n_steps=50"])
    out = capsys.readouterr().out
    options = [line for line in out.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=2" in options and "#SBATCH --requeue" in options
    signal_option = next(o for o in options if o.startswith("#SBATCH --signal="))
    warning = "SIG" + signal_option.split("=")[1].split("@")[0]
    config = compose_config([])
    assert warning in config.reliability.requeue_signals  # the warning signal requeues
    lines = out.strip().splitlines()
    srun, python = shlex.split(lines[-3]), shlex.split(lines[-1])
    # every task runs the workstation script (which execs python: signals reach python)
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "bash", "scripts/train_owt_flm.sh"]
    assert python[:4] == ["python", "-u", "-m", "main"]
    overrides = _main_overrides(python)
    assert "checkpointing.save_dir=/runs/flm-owt-0" in overrides
    assert overrides[-1] == "trainer.log_every_n_steps=50"
    # the task's command is the script's own command, then the cluster's, then the user's
    _render_module().write_stand_in_python(tmp_path)  # prints the command it gets
    env = {**os.environ, "DATA_DIR": "/data", "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    alone = subprocess.run(["bash", "scripts/train_owt_flm.sh"], cwd=REPO, capture_output=True,
                           text=True, env=env, check=True)
    script_command = shlex.split(alone.stdout)
    assert python[:len(script_command)] == script_command
    # the command composes and resolves: 2 nodes x 8 GPUs x 32 = 512, no accumulation
    hydra_free = [o for o in overrides if not o.startswith("hydra.")]
    resolved = resolve_config(compose_config(hydra_free))
    assert (resolved.trainer.devices, resolved.trainer.num_nodes) == (8, 2)
    assert resolved.trainer.accumulate_grad_batches == 1 and resolved.loader.batch_size == 32
    assert resolved.checkpointing.resume_from_ckpt


def test_submitit_launcher_renders_requeueing_job():
    text = _render_module().render_submitit(["trainer.devices=8", "trainer.num_nodes=2"])
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=8" in text
    assert "#SBATCH --gpus-per-node=8" in text and "#SBATCH --requeue" in text
    signal_line = next(line for line in text.splitlines() if "--signal=" in line)
    warning = "SIG" + signal_line.split("=")[1].split("@")[0]
    assert warning in compose_config([]).reliability.requeue_signals
