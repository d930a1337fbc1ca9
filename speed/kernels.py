"""Small elementwise kernels compiled on CUDA: the EMA's update."""

from __future__ import annotations

import torch

from speed.compile import room_for_graphs
from speed.options import SpeedOptions

_compiled_lerp: list = []


def lerp_towards(ema: list[torch.Tensor], live: list[torch.Tensor], weight: torch.Tensor) -> None:
    """``ema += weight·(live - ema)`` for each pair, ``weight`` a 0-d device tensor read on the
    device (the overload taking one weight number reads it on the host: a sync per step)."""
    torch._foreach_lerp_(ema, live, [weight] * len(ema))


def fused_lerp_towards(ema: list[torch.Tensor], live: list[torch.Tensor], weight: torch.Tensor,
                       options: SpeedOptions) -> None:
    """``lerp_towards``; on CUDA with ``options.fused`` compiled once (static shapes): eagerly
    it is one kernel launch per tensor (one weight tensor per tensor is not the multi-tensor
    fast path), compiled a few. The warm-up's changing rate is in ``weight``, so one graph
    serves every step."""
    if not options.fused_on(weight.device):
        lerp_towards(ema, live, weight)
        return
    if not _compiled_lerp:
        room_for_graphs()
        _compiled_lerp.append(torch.compile(lerp_towards, dynamic=False))
    _compiled_lerp[0](ema, live, weight)
