"""The run's settings checked before any work (``ConfigError`` names the key) and the
values derived from them: devices, per-device batches, accumulation, precision, loader workers."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from speed import FUSED_CE_CHOICES

log = logging.getLogger(__name__)

MODES = ("train", "ppl_eval", "sample_eval", "generate")
PRECISIONS = {"32": "32-true", "32-true": "32-true", "bf16": "bf16-mixed",
              "bf16-mixed": "bf16-mixed", "16": "16-mixed", "16-mixed": "16-mixed",
              "64": "64-true", "64-true": "64-true"}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


def device_count(config: DictConfig) -> int:
    devices = config.trainer.devices
    if devices == "auto":
        if config.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return torch.cuda.device_count()
        return 1
    if isinstance(devices, int) and devices >= 1:
        return devices
    raise ConfigError(f"trainer.devices={devices!r}: use a positive integer or 'auto'")


PROFILERS = (None, "simple", "advanced")  # trainer.profiler
STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}  # sampling.state_dtype


def resolve_config(config: DictConfig) -> DictConfig:
    """Check the run's settings and derive per-device batch sizes and gradient accumulation.

    Global batch = devices * nodes * batch_size * accumulate_grad_batches. The algorithm's own
    settings are checked by its entry in flow/registry.py (``algo.resolve_config`` runs both).
    """
    if config.mode not in MODES:
        raise ConfigError(f"mode={config.mode!r}; expected one of {MODES}")
    _check_types(config)
    if config.trainer.get("profiler") not in PROFILERS:
        raise ConfigError(f"trainer.profiler={config.trainer.profiler!r}; expected one of "
                          f"{PROFILERS} (Lightning's host-time profilers; null: none)")
    _check_values(config)
    devices = device_count(config)
    nodes = int(config.trainer.num_nodes)
    world = devices * nodes
    loader = config.loader
    with open_dict(config):
        config.trainer.devices = devices
        config.trainer.precision = _precision(config.trainer.precision)
        if loader.global_batch_size % world:
            raise ConfigError(f"loader.global_batch_size={loader.global_batch_size} is not "
                              f"divisible by devices*nodes={devices}*{nodes}")
        if loader.batch_size is None:
            loader.batch_size = loader.global_batch_size // world
        if loader.global_batch_size % (world * loader.batch_size):
            raise ConfigError(
                f"loader.global_batch_size={loader.global_batch_size} is not divisible by "
                f"devices*nodes*loader.batch_size={devices}*{nodes}*{loader.batch_size}")
        config.trainer.accumulate_grad_batches = (loader.global_batch_size
                                                  // (world * loader.batch_size))
        if loader.eval_batch_size is None:
            if loader.eval_global_batch_size % world:
                raise ConfigError(f"loader.eval_global_batch_size="
                                  f"{loader.eval_global_batch_size} is not divisible by "
                                  f"devices*nodes={world}")
            loader.eval_batch_size = loader.eval_global_batch_size // world
    model = config.model
    if model.hidden_size % model.n_heads or (model.hidden_size // model.n_heads) % 2:
        raise ConfigError(f"model.hidden_size={model.hidden_size} must be divisible by "
                          f"model.n_heads={model.n_heads} into an even head size (rotary)")
    if not 0.0 <= config.training.t_min < config.training.t_max <= 1.0:
        raise ConfigError("need 0 <= training.t_min < training.t_max <= 1, got "
                          f"{config.training.t_min}, {config.training.t_max}")
    if config.sampling.state_dtype not in STATE_DTYPES:
        raise ConfigError(f"sampling.state_dtype={config.sampling.state_dtype!r}; "
                          f"expected one of {list(STATE_DTYPES)}")
    steps = config.sampling.steps
    if not OmegaConf.is_list(steps) or not steps or any(int(s) < 1 for s in steps):
        raise ConfigError(f"sampling.steps={steps}: give a non-empty list of positive "
                          "integers, e.g. sampling.steps=[1,2,4]")
    _check_distributed_and_reliability(config)
    workers, pin = resolve_loader_workers(config)
    with open_dict(config):
        loader.num_workers, loader.pin_memory = workers, pin
    return config


AUTO_WORKERS = 4  # loader.num_workers=auto on CUDA (the paper's code uses 4 with pinned memory)


def resolve_loader_workers(config: DictConfig) -> tuple[int, bool]:
    """(worker processes, pinned memory) from ``loader.num_workers`` and ``loader.pin_memory``.

    ``auto`` is ``AUTO_WORKERS`` workers and pinned memory when the run uses CUDA, so batches
    are made while the GPU computes and copied without stalling the step, and 0 / false on
    the CPU. Anything but ``auto``, a count >= 0 or a boolean is a ConfigError."""
    loader, accelerator = config.loader, str(config.trainer.accelerator)
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto"
                                              and torch.cuda.is_available())
    workers, pin = loader.num_workers, loader.pin_memory
    if workers == "auto":
        workers = AUTO_WORKERS if cuda else 0
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"loader.num_workers={loader.num_workers!r}: use auto or a count >= 0")
    if pin == "auto":
        pin = cuda
    if not isinstance(pin, bool):
        raise ConfigError(f"loader.pin_memory={loader.pin_memory!r}: use auto, true or false")
    return workers, pin


# Numeric keys read with int()/float() below and deep in Lightning: a value that does not parse
# (``loader.global_batch_size=abc``) is a ConfigError naming the key, not a ValueError there.
INTEGER_KEYS = ("seed", "loader.global_batch_size", "loader.eval_global_batch_size",
                "loader.batch_size", "loader.eval_batch_size", "trainer.max_steps",
                "trainer.num_nodes", "trainer.log_every_n_steps", "trainer.num_sanity_val_steps",
                "trainer.accumulate_grad_batches", "model.length", "model.hidden_size",
                "model.n_heads", "model.n_blocks", "sampling.batch_size",
                "sampling.position_chunk", "sampling.print_samples", "eval.num_samples",
                "generate.num_samples", "reliability.max_consecutive_nonfinite")
NUMBER_KEYS = ("optim.lr", "optim.beta1", "optim.beta2", "optim.eps", "optim.weight_decay",
               "training.ema", "training.t_min", "training.t_max", "trainer.gradient_clip_val",
               "sampling.denominator_eps", "trainer.val_check_interval",
               "trainer.limit_val_batches")
NULLABLE_KEYS = ("loader.batch_size", "loader.eval_batch_size", "trainer.accumulate_grad_batches",
                 "trainer.gradient_clip_val", "trainer.val_check_interval")


def _check_types(config: DictConfig) -> None:
    """ConfigError for a value of ``INTEGER_KEYS`` / ``NUMBER_KEYS`` that is not a number."""
    for keys, kinds, expected in ((INTEGER_KEYS, (int,), "an integer"),
                                  (NUMBER_KEYS, (int, float), "a number")):
        for key in keys:
            value = OmegaConf.select(config, key, default=None)
            if value is None and (key in NULLABLE_KEYS or OmegaConf.select(
                    config, key, default="missing") == "missing"):
                continue
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ConfigError(f"{key}={value!r}: expected {expected}")


def _check_values(config: DictConfig) -> None:
    """Values that would fail (or silently do nothing) deep inside Lightning or PyTorch."""
    loader, tc = config.loader, config.trainer
    for key in ("global_batch_size", "eval_global_batch_size"):
        if int(loader[key]) < 1:
            raise ConfigError(f"loader.{key}={loader[key]}: must be a positive number of "
                              "sequences")
    for key in ("batch_size", "eval_batch_size"):
        if loader[key] is not None and int(loader[key]) < 1:
            raise ConfigError(f"loader.{key}={loader[key]}: must be a positive per-device batch "
                              "or null (derived from the global batch)")
    interval = tc.val_check_interval
    if interval is not None and (interval <= 0 or (isinstance(interval, float) and interval > 1)):
        raise ConfigError(f"trainer.val_check_interval={interval}: give a positive number of "
                          "optimizer steps (int) or a fraction of an epoch in (0, 1]")
    if int(tc.max_steps) < 0:
        raise ConfigError(f"trainer.max_steps={tc.max_steps}: must be >= 0 (optimizer steps)")
    if not float(config.optim.lr) > 0:
        raise ConfigError(f"optim.lr={config.optim.lr}: the learning rate must be > 0")
    warmup = config.get("lr_scheduler", {}).get("num_warmup_steps")
    if warmup is not None and int(warmup) < 0:
        raise ConfigError(f"lr_scheduler.num_warmup_steps={warmup}: must be >= 0")
    if config.training.fused_ce not in FUSED_CE_CHOICES:
        raise ConfigError(f"training.fused_ce={config.training.fused_ce!r}; expected one of "
                          f"{list(FUSED_CE_CHOICES)} (speed/cross_entropy.py)")


STRATEGIES = ("ddp", "fsdp")  # which algorithm may use which: flow/registry.py


def fsdp_training(config: DictConfig) -> bool:
    """strategy=fsdp shards training only; evaluation modes build an unsharded model."""
    return config.strategy.name == "fsdp" and config.get("mode", "train") == "train"


def _check_distributed_and_reliability(config: DictConfig) -> None:
    """Checks that would otherwise fail only after the GPUs are set up (or hours later)."""
    name = config.strategy.name
    if name not in STRATEGIES:
        raise ConfigError(f"strategy={name!r} is unknown; use one of {list(STRATEGIES)}")
    cb = config.get("callbacks", {})
    if ("checkpoint_every_n_steps" in cb and "checkpoint_last" in cb
            and cb.checkpoint_every_n_steps.every_n_train_steps
            == cb.checkpoint_last.every_n_train_steps):
        raise ConfigError(
            "callbacks.checkpoint_every_n_steps.every_n_train_steps and callbacks.checkpoint_last."
            "every_n_train_steps are equal; Lightning tells the two ModelCheckpoint states apart "
            "by their settings: make them differ")
    rc = config.get("reliability")
    if rc is None:
        return
    if int(rc.max_consecutive_nonfinite) < 1:
        raise ConfigError(f"reliability.max_consecutive_nonfinite={rc.max_consecutive_nonfinite}"
                          "; must be >= 1")
    for key in ("checkpoint_signals", "requeue_signals"):
        unknown = [s for s in rc[key] if s not in signal.Signals.__members__]
        if unknown:
            raise ConfigError(f"reliability.{key} has unknown signal names {unknown}; use "
                              "names such as SIGUSR1, SIGTERM")
    extra = set(rc.requeue_signals) - set(rc.checkpoint_signals)
    if extra:
        raise ConfigError(f"reliability.requeue_signals {sorted(extra)} must also be in "
                          "reliability.checkpoint_signals (a requeue needs a checkpoint)")


def _precision(value) -> str:
    key = str(value)
    if key not in PRECISIONS:
        raise ConfigError(f"trainer.precision={value!r}; expected one of {sorted(PRECISIONS)}")
    return PRECISIONS[key]


def save_config(config: DictConfig, directory: str | Path) -> Path:
    path = Path(directory) / "config_resolved.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(config, resolve=True))
    return path
