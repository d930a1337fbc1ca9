"""Small fused kernels of the losses: elementwise algebra over (B, L, V) compiled on CUDA.

Where compilation of whole networks lives is models/parallelize.py; these are the pieces of
the losses between network calls (softmaxes, the distillation targets, the CE's gradient),
which eagerly cost a full float32 pass over memory per op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

_FUSED_KERNELS = {"enabled": True, "devices": ("cuda",)}  # devices whose inputs compile
_compiled_kernels: dict[Callable, Callable] = {}


def use_fused_kernels(enabled: bool) -> None:
    """Whether ``fused_kernel`` compiles (training.compile: false also keeps these eager)."""
    if enabled != _FUSED_KERNELS["enabled"]:
        log.info("fused loss kernels %s (training.compile=%s)",
                 "compiled on CUDA" if enabled else "eager", enabled)
    _FUSED_KERNELS["enabled"] = enabled


def fused_kernels_on(device: torch.device) -> bool:
    """Whether tensors on ``device`` go through compiled (or hand-written GPU) kernels."""
    return _FUSED_KERNELS["enabled"] and device.type in _FUSED_KERNELS["devices"]


def fused_kernel(fn: Callable) -> Callable:
    """``fn`` (pure tensor algebra), compiled once with static shapes when its first tensor
    argument is on CUDA and fused kernels are on (``use_fused_kernels``), else run eagerly.

    Inductor turns a chain of B x L x V elementwise ops and reductions (softmaxes, the
    distillation targets, the CE's gradient) into one or two passes over memory; each op
    eagerly is a full float32 pass (bench/profile_step.py showed them as a third of a
    distillation step). The same function runs eagerly on the CPU, where the tests compare
    it with float64 references."""
    def run(*args):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        if not fused_kernels_on(first.device):
            return fn(*args)
        if fn not in _compiled_kernels:
            from models.parallelize import room_for_graphs  # here: models imports flow

            room_for_graphs()
            _compiled_kernels[fn] = torch.compile(fn, dynamic=False)
        return _compiled_kernels[fn](*args)

    run.__name__, run.__doc__, run.eager = fn.__name__, fn.__doc__, fn
    return run
