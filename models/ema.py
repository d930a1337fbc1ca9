"""Exponential moving average of parameters, swappable into the live model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    """Shadow copy ``ema = decay·ema + (1 - decay)·param`` of trainable parameters."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"training.ema must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters()
                       if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        names, ema, live = [], [], []
        for n, p in module.named_parameters():
            if n in self.shadow:
                names.append(n)
                ema.append(self.shadow[n])
                live.append(p.detach())
        torch._foreach_lerp_(ema, live, 1.0 - self.decay)

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

    def to(self, device: torch.device) -> EMA:
        self.shadow = {n: v.to(device) for n, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {n: v.clone() for n, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks parameters {sorted(missing)[:5]}...")
        self.decay = state["decay"]
        for n in self.shadow:
            self.shadow[n] = state["shadow"][n].to(self.shadow[n].device,
                                                   self.shadow[n].dtype).clone()
