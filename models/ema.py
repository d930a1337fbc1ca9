"""Exponential moving average of parameters, swappable into the live model.

The decay warms up as in the paper's code (MDLM's ``ExponentialMovingAverage``,
which FLM inherits): the n-th update (n = 1, 2, ...) uses
``min(decay, (1 + n) / (10 + n))``, so early averages are not dominated by the
initial weights. ``num_updates`` counts the updates made and is saved.

Under FSDP (strategy=fsdp) the parameters are sharded DTensors: the shadow is
then sharded the same way (each rank keeps its shard only), checkpoints hold
the gathered full tensors, and loading scatters them back into shards. A
checkpoint written under one strategy therefore loads under the other.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from speed.kernels import fused_lerp_towards
from speed.options import SpeedOptions

log = logging.getLogger(__name__)


def warmup_decay(decay: float, n: int) -> float:
    """The decay of the n-th update (n >= 1): ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + n) / (10.0 + n))


class EMA:
    """Shadow copy ``ema = d_n·ema + (1 - d_n)·param`` of trainable parameters, d_n warmed up."""

    def __init__(self, module: nn.Module, decay: float, speed: SpeedOptions | None = None,
                 ) -> None:
        """``speed``: whether the device-side-skip update runs as a compiled kernel (CUDA)."""
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"training.ema must be in [0, 1), got {decay}")
        self.decay = decay
        self.speed = speed if speed is not None else SpeedOptions()
        self.num_updates = 0  # updates made so far
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters()
                       if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module, skip: torch.Tensor | bool = False) -> None:
        """One update after an optimizer step. ``skip``: the step was skipped (non-finite), so
        the shadow stays as it is; a device tensor (reliability.NonFiniteGuard's device-side
        skip) is applied on the device, without reading it on the host, and the update is
        counted until the guard reads the flag and calls ``uncount``."""
        if not isinstance(skip, torch.Tensor) and skip:
            return
        ema, live = [], []
        for n, p in module.named_parameters():
            if n in self.shadow:
                ema.append(self.shadow[n])
                live.append(p.detach())
        self.num_updates += 1
        rate = 1.0 - warmup_decay(self.decay, self.num_updates)
        if isinstance(skip, torch.Tensor):
            fused_lerp_towards(ema, live, rate * (~skip).float(), self.speed)
        else:
            torch._foreach_lerp_(ema, live, rate)

    def uncount(self) -> None:
        """Take back the count of an update that a device-side skip turned into no change."""
        self.num_updates = max(self.num_updates - 1, 0)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n])

    @contextlib.contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[None]:
        """Run a block with the EMA weights in ``module``, then restore."""
        backup = {n: p.detach().clone() for n, p in module.named_parameters() if n in self.shadow}
        self.copy_to(module)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in module.named_parameters():
                    if n in backup:
                        p.copy_(backup[n])

    @torch.no_grad()
    def shard_like(self, module: nn.Module) -> None:
        """Keep only this rank's shard of each shadow, placed as ``module``'s (FSDP) parameter."""
        for n, p in module.named_parameters():
            if n in self.shadow and isinstance(p, DTensor) and not isinstance(self.shadow[n],
                                                                              DTensor):
                self.shadow[n] = _shard_like(self.shadow[n], p)

    def to(self, device: torch.device) -> EMA:
        self.shadow = {n: v.to(device) for n, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict:
        """Full tensors; with sharded shadows a collective (every rank must call it)."""
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {n: _full(v) for n, v in self.shadow.items()}}

    def load_state_dict(self, state: dict, global_step: int | None = None) -> None:
        """Load a ``state_dict``. States written before the warm-up existed lack
        ``num_updates``: it is then taken as ``global_step`` (the EMA is updated once per
        optimizer step, so this is exact unless steps were skipped as non-finite), or 0
        when that is unknown too; either way with a logged warning."""
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks parameters {sorted(missing)[:5]}...")
        self.decay = state["decay"]
        if "num_updates" in state:
            self.num_updates = int(state["num_updates"])
        else:
            self.num_updates = int(global_step) if global_step is not None else 0
            log.warning("EMA state without num_updates (written before the decay warm-up): "
                        "taking num_updates=%d (%s)", self.num_updates,
                        "the checkpoint's global step" if global_step is not None
                        else "no global step known")
        for n, now in self.shadow.items():
            full = state["shadow"][n]
            if tuple(full.shape) != tuple(now.shape):
                raise ValueError(f"EMA state of {n} has shape {tuple(full.shape)}, the model "
                                 f"{tuple(now.shape)}")
            if isinstance(now, DTensor):  # collective: scatter into this rank's shard
                self.shadow[n] = _shard_like(full, now)
            else:
                self.shadow[n] = full.to(now.device, now.dtype).clone()


def _shard_like(full: torch.Tensor, like: DTensor) -> DTensor:
    """This rank's shard of ``full``, on ``like``'s device, dtype, mesh and placements."""
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)


def _full(value: torch.Tensor) -> torch.Tensor:
    if isinstance(value, DTensor):
        return value.full_tensor().cpu()  # gathered shard by shard, kept off the accelerator
    return value.clone()
