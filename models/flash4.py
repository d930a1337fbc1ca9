"""Soft-capped attention through FlashAttention-4's CuTe kernels, as torch custom ops.

The optional ``flash-attn-4`` package (module ``flash_attn.cute``) computes
``softmax(softcap·tanh(q k^T / (sqrt(hd)·softcap))) v`` and its gradients on Hopper and
Blackwell GPUs without materialising the L x L logits, as the paper's flash-attn 2 call
does. Its functions are plain Python around JIT-compiled kernels, which torch.compile cannot
trace; wrapped here as two custom ops (forward -> (out, lse), backward -> (dq, dk, dv)) with
shape-only fake implementations, a compiled model keeps one graph around each call.

Inputs and output are (B, L, H, hd), the layout of flash-attn's kernels.

Not chosen by ``models.dit.attention``: on an H200 at DiT small's shape (hd = 64, L = 1024,
softcap 50) these kernels took 2.80 ms forward + backward per layer against 2.22 ms for our
compiled FlexAttention (bench/components.py, bench/results/components_h200_round8.txt).
bench/components.py times them beside the other backends wherever the package is installed
(Blackwell, their main target, was not measured here).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

MIN_CAPABILITY = (9, 0)  # FA4's forward and backward kernels: SM90 (Hopper) and newer


def _installed() -> bool:
    """Whether ``flash_attn.cute`` (the flash-attn-4 package) can be imported."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):
        return False


# read once at import: a compiled model's trace then sees a constant, not an import lookup
INSTALLED = _installed()


def supports(q: torch.Tensor) -> bool:
    """Whether the FA4 kernels run on ``q``'s device and dtype (and the package is there)."""
    return (INSTALLED and q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(q.device) >= MIN_CAPABILITY)


def _kernels() -> tuple[Callable, Callable]:
    """FA4's forward and backward entry points: ``fwd(q, k, v, causal, softcap) -> (out, lse)``
    and ``bwd(q, k, v, out, dout, lse, causal, softcap) -> (dq, dk, dv)``; lse is float32
    (B, H, L), the natural-log normaliser of each query's softmax."""
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

    def fwd(q, k, v, causal, softcap):
        out, lse, *_ = _flash_attn_fwd(q, k, v, causal=causal, softcap=softcap,
                                       return_lse=True)
        return out, lse

    def bwd(q, k, v, out, dout, lse, causal, softcap):
        dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, None, causal, softcap)
        return dq, dk, dv

    return fwd, bwd


@torch.library.custom_op("flm::fa4_attention_forward", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float,
             causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _kernels()[0](q, k, v, causal, softcap)
    return out, lse


@_forward.register_fake
def _(q, k, v, softcap, causal):
    b, length, heads, _ = q.shape
    return (q.new_empty(q.shape[:-1] + v.shape[-1:]),
            q.new_empty((b, heads, length), dtype=torch.float32))


@torch.library.custom_op("flm::fa4_attention_backward", mutates_args=())
def _backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor, softcap: float,
              causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _kernels()[1](q, k, v, out, dout, lse, causal, softcap)
    return dq, dk, dv


@_backward.register_fake
def _(dout, q, k, v, out, lse, softcap, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, softcap, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.softcap, ctx.causal = softcap, causal


def _autograd_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _backward(dout.contiguous(), q, k, v, out, lse, ctx.softcap, ctx.causal)
    return dq, dk, dv, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float,
              causal: bool) -> torch.Tensor:
    """(B, L, H, hd) x3 -> (B, L, H, hd): soft-capped attention by FA4's kernels."""
    return _forward(q, k, v, float(softcap), bool(causal))[0]
