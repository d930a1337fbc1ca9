"""The optimizer step's gradient handling: per-tensor norms read once, clipping by the global
norm, and AdamW as the runs build it.

A step reads the gradients for the non-finite check (``reliability.NonFiniteGuard``), for the
clipping norm and in AdamW's update. ``torch.nn.utils.clip_grad_norm_`` reads them twice more
(its norms, then a multiply that writes them back). Here the guard's per-tensor norms serve the
clipping norm (:func:`gradient_norms`, carried by :class:`StepHealth`), and with a fused Adam(W)
and no loss scaler the clipping factor goes to the fused kernel as its ``grad_scale`` (the
kernel divides each gradient by it as it reads it): clipping then costs no pass over the
gradients of its own. Elsewhere (a foreach AdamW, a loss scaler, sharded DTensor gradients) the
gradients are multiplied in place, as ``clip_grad_norm_`` does.

The update is ``clip_grad_norm_``'s up to float32 rounding: ``g / s`` with
``s = max(1, (|g| + CLIP_EPS) / max_norm)`` against ``g · min(1, max_norm / (|g| + CLIP_EPS))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

CLIP_EPS = 1e-6  # added to the global norm before dividing, as torch's clip_grad_norm_ does
KERNEL_INPUTS = ("found_inf", "grad_scale")  # what torch's fused Adam(W).step reads off itself


@dataclass
class StepHealth:
    """What one optimizer step's checks found, handed from the non-finite guard to the clipping,
    the optimizer's kernel and the EMA update. The Lightning module owns one per step.

    * ``skipped``: the step is skipped (a bool; a device flag when the fused kernel skips it);
    * ``grad_norms``: the per-tensor gradient norms the guard read (:func:`gradient_norms`),
      reused by the clipping; None when not read (no guard, sharded gradients);
    * ``found_inf``: the skip flag for the fused kernel (None: skipped on the host, or not);
    * ``grad_scale``: the clipping factor for the fused kernel (None: clipped in place, or not).
    """

    skipped: bool | torch.Tensor = False
    grad_norms: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None
    grad_scale: torch.Tensor | None = None

    def hand_to(self, optimizer: torch.optim.Optimizer) -> None:
        """Give ``optimizer``'s next ``step`` this step's ``found_inf`` and ``grad_scale``
        (the attributes torch's Adam(W) passes to its fused kernel, as ``GradScaler`` sets
        them); one left by an earlier step is removed."""
        for name in KERNEL_INPUTS:
            value = getattr(self, name)
            if value is None:
                optimizer.__dict__.pop(name, None)
            else:
                setattr(optimizer, name, value)


def build_adamw(params, optim_config, device: torch.device) -> torch.optim.AdamW:
    """AdamW from the ``optim`` config group; ``fused: auto`` is the fused kernel on CUDA."""
    fused = optim_config.fused
    if fused == "auto":
        fused = device.type == "cuda" or torch.cuda.is_available()
    return torch.optim.AdamW(params, lr=optim_config.lr,
                             betas=(optim_config.beta1, optim_config.beta2),
                             eps=optim_config.eps, weight_decay=optim_config.weight_decay,
                             fused=bool(fused))


def gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The gradients the optimizer will apply (parameters without one are left out)."""
    return [p.grad for group in optimizer.param_groups for p in group["params"]
            if p.grad is not None]


def scales_on_device(optimizer: torch.optim.Optimizer, scaler: object | None,
                     grads: list[torch.Tensor]) -> bool:
    """Whether ``optimizer``'s own kernel takes the step's gradient scale and skip flag as
    device tensors (``grad_scale``, ``found_inf``): a fused Adam(W), no loss scaler (which sets
    both itself) and no sharded (DTensor) gradients."""
    return (isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
            and bool(optimizer.defaults.get("fused"))
            and scaler is None
            and not any(isinstance(g, DTensor) for g in grads))


def gradient_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """``(n,)`` float32: the 2-norm of each gradient tensor, in one multi-tensor read."""
    return torch.stack([n.float() for n in torch._foreach_norm(grads)])


def clip_by_global_norm(optimizer: torch.optim.Optimizer, max_norm: float,
                        scaler: object | None = None, norms: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Clip the optimizer's gradients to global 2-norm ``max_norm``: -> (the norm before
    clipping, a device scalar; the fused kernel's ``grad_scale`` or None); (None, None)
    without gradients.

    ``norms``: the per-tensor norms of these same gradients (:func:`gradient_norms`), when
    already read this step. With :func:`scales_on_device` the gradients are left as they are
    and the factor is returned, for :meth:`StepHealth.hand_to` to give the optimizer's next
    ``step`` (which must follow before the gradients change); otherwise the gradients are
    scaled in place. DTensor (FSDP) gradients are clipped by their norm over all shards
    (``norms``, a rank's own shard, is not used for them)."""
    if max_norm <= 0:
        raise ValueError(f"max_norm={max_norm}: must be > 0 (no clipping: do not call this)")
    params = [p for group in optimizer.param_groups for p in group["params"]
              if p.grad is not None]
    if not params:
        return None, None
    grads = [p.grad for p in params]  # gradients(optimizer), from the walk above
    if any(isinstance(g, DTensor) for g in grads):
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return (total.full_tensor() if isinstance(total, DTensor) else total), None
    if norms is None:
        norms = gradient_norms(grads)
    elif norms.shape != (len(grads),):
        raise ValueError(f"norms of shape {tuple(norms.shape)} for {len(grads)} gradients")
    total = torch.linalg.vector_norm(norms)
    if scales_on_device(optimizer, scaler, grads):
        return total, torch.clamp((total + CLIP_EPS) / max_norm, min=1.0)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total, None
