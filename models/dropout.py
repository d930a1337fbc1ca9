"""Dropout whose random mask is drawn in bulk: ``torch.ops.flm.keep_mask``.

Inside a compiled network, torch's dropout becomes inductor's in-kernel random numbers: one
Philox evaluation (ten rounds of 32-bit multiplies) per element, fused into the kernel that
adds the branch to the residual stream and normalises it, and evaluated again in the
backward, which recomputes the mask instead of saving it. At DiT small's 25 M elements per
dropout, two dropouts per block, forward and backward, that integer work, not memory
traffic, set the time of those kernels (about three times what they move would take on an
H200; bench/results/profile_h200_round10.txt).

``keep_mask`` is a custom op, opaque to the compiler: one eager ``bernoulli_`` kernel
(four numbers per Philox evaluation, written as one byte per element), the mask saved for
the backward (the partitioner never recomputes an op outside its allow-list, so no second
draw can disagree with the first), and the product ``x · mask / (1 - p)`` left to inductor
to fuse with its neighbours. Same distribution as ``torch.nn.functional.dropout`` (each
element kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``), a different random
stream; the mask draws from the default generator of ``x``'s device, so seeding and the
checkpointed RNG states (reliability.py) cover it as they cover torch's dropout.

``DROPOUT_FORM`` picks the form for models built afterwards: ``mask`` (default) or
``inline`` (``F.dropout``: inductor's in-kernel numbers when compiled; bench/train_step.py
``--dropout-forms`` measures both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DROPOUT_FORMS", "Dropout", "keep_mask", "new_mask"]

DROPOUT_FORMS = ("mask", "inline")
DROPOUT_FORM = "mask"


@torch.library.custom_op("flm::keep_mask", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """A bool tensor of ``like``'s shape and device, each element True with probability
    ``1 - p``, independently; ``like``'s values are not read.

    Pass a fresh ``torch.empty`` (``new_mask``): the compiler's common-subexpression pass
    merges two calls of an op with equal arguments unless the op is one of aten's random
    ops, which a custom op is not; ``aten.empty`` is exempt from that pass too, so each
    call, made on its own empty tensor, stays a separate draw (even for two dropouts of the
    same tensor, tests/test_dropout.py). The tag tells the partitioner it is random: a
    recomputed (activation-checkpointed) call replays the saved generator state.
    """
    return torch.empty(like.shape, dtype=torch.bool, device=like.device).bernoulli_(1.0 - p)


@keep_mask.register_fake
def _(like: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty(like.shape, dtype=torch.bool, device=like.device)


def new_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """``keep_mask`` for ``x``: True (keep) with probability ``1 - p`` per element."""
    return keep_mask(torch.empty(x.shape, dtype=torch.bool, device=x.device), p)


class Dropout(nn.Module):
    """``nn.Dropout(p)`` through ``keep_mask`` (form ``mask``) or ``F.dropout`` (``inline``);
    the form is read when the module is built."""

    def __init__(self, p: float, form: str | None = None) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability {p}: expected a value in [0, 1]")
        form = DROPOUT_FORM if form is None else form
        if form not in DROPOUT_FORMS:
            raise ValueError(f"dropout form {form!r}: expected one of {DROPOUT_FORMS}")
        self.p, self.form = p, form

    def extra_repr(self) -> str:
        return f"p={self.p}, form={self.form}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.form == "inline":
            return F.dropout(x, self.p, training=True)
        if self.p == 1.0:
            return x * 0.0
        return x * new_mask(x, self.p) * (1.0 / (1.0 - self.p))
