"""The run's speed settings, one frozen object built once and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

FUSED_CE_CHOICES = ("auto", "chunked", "none")  # training.fused_ce


@dataclass(frozen=True)
class SpeedOptions:
    """How fast forms replace plain ones.

    * ``fused``: hand-written and compiled kernels for tensors on CUDA (the fused CE's Triton
      chunk kernel, the EMA's compiled lerp);
    * ``compile``: ``torch.compile`` of the networks and of the distillation losses;
    * ``fused_ce``: the output layer's cross-entropy, ``chunked`` (speed.cross_entropy: the
      (B, L, V) logits never exist at once) or ``none`` (the plain ``F.linear`` + CE).

    The default is everything off: the plain PyTorch math.
    """

    fused: bool = False
    compile: bool = False
    fused_ce: str = "none"

    def __post_init__(self) -> None:
        if self.fused_ce not in ("chunked", "none"):
            raise ValueError(f"SpeedOptions.fused_ce={self.fused_ce!r}: 'chunked' or 'none' "
                             "(resolve training.fused_ce with SpeedOptions.from_settings)")

    @classmethod
    def from_settings(cls, compile: bool, fused_ce: str) -> SpeedOptions:
        """From ``training.compile`` and ``training.fused_ce`` (auto | chunked | none; ``auto``
        is ``chunked``, the fastest on every device measured: bench/results/)."""
        if fused_ce not in FUSED_CE_CHOICES:
            raise ValueError(f"training.fused_ce={fused_ce!r} is not one of {FUSED_CE_CHOICES}")
        return cls(fused=bool(compile), compile=bool(compile),
                   fused_ce="none" if fused_ce == "none" else "chunked")

    def fused_on(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` go through the fused (CUDA) kernels."""
        return self.fused and device.type == "cuda"
