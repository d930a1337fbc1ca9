"""Soft-capped attention ``softmax(softcap·tanh(q kᵀ / (sqrt(hd)·softcap))) v`` and its backends.

``math_attention`` is the plain computation (it materialises the (B, H, L, L) scores): what
runs on the CPU and what the tests compare against. On CUDA, ``attention`` runs a fused
kernel instead, which never holds the scores: flash-attn >= 2.6 (the paper's kernel, with
``softcap``) when it is installed and the inputs are bf16/fp16, else FlexAttention with the
cap as a score_mod whose tanh is the GPU's one-instruction ``tanh.approx.f32``
(speed/approx_tanh.py, as flash-attn evaluates it). Without a cap, torch's SDPA.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from speed import approx_tanh, flex_blocks
from speed.compile import compile_options

log = logging.getLogger(__name__)

_logged_backends: set[str] = set()
_compiled_flex: list[Callable] = []
_causal_block_masks: dict[tuple[int, str], object] = {}
# one score_mod object per cap: compiled graphs guard on the function object (a plain dict,
# not functools.cache, which dynamo warns about and bypasses inside a trace)
_score_mods: dict[float, Callable] = {}


def _log_backend(name: str) -> None:
    """Log the attention backend once (not from inside a torch.compile trace: a graph break)."""
    if not torch.compiler.is_compiling() and name not in _logged_backends:
        _logged_backends.add(name)
        log.info("attention backend: %s", name)


@functools.cache
def _flash_attn_softcap() -> Callable | None:
    """flash_attn_func when flash-attn >= 2.6 (the version with ``softcap``) is importable.

    flash-attn-4 alone also makes ``flash_attn`` importable (a namespace package holding
    ``flash_attn.cute``, without ``flash_attn_func`` or a version): that is not flash-attn 2.
    """
    try:
        import flash_attn  # optional (CUDA builds only): probed on first use
    except ImportError:
        return None
    version = getattr(flash_attn, "__version__", None)
    if version is None or not hasattr(flash_attn, "flash_attn_func"):
        return None
    major, minor = (int(p) for p in version.split(".")[:2])
    return flash_attn.flash_attn_func if (major, minor) >= (2, 6) else None


# resolved once at import: an import attempted inside a compiled trace is a graph break
_FLASH2 = _flash_attn_softcap()


def _flex_attention() -> Callable:
    """FlexAttention: inside a compiled network's trace the function itself, traced into the
    network's graph (one forward and one backward graph per network, not two per block);
    outside one (an eager network, a bench) compiled on its own, once, lazily."""
    if torch.compiler.is_compiling():
        return flex_attention
    if not _compiled_flex:
        _compiled_flex.append(torch.compile(flex_attention, dynamic=False,
                                            options=compile_options()))
    return _compiled_flex[0]


def _causal_block_mask(length: int, device: torch.device):
    key = (length, str(device))
    if key not in _causal_block_masks:
        _causal_block_masks[key] = create_block_mask(
            lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, B=None, H=None, Q_LEN=length,
            KV_LEN=length, device=device)
    return _causal_block_masks[key]


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float | None,
                   causal: bool) -> torch.Tensor:
    """The plain computation, (B, H, L, hd) x3 -> (B, H, L, hd); materialises (B, H, L, L)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _on_cuda(q: torch.Tensor) -> bool:
    return q.device.type == "cuda"


# Shortest sequence FlexAttention takes here. Compiled FlexAttention returned wrong outputs at
# L = 8 in some processes (max |error| 0.91 against math_attention on the CPU, torch 2.13, with
# and without a score_mod; on an H100 a loss through it compiled whole disagreed with the same
# loss through it compiled alone), and was right at every length from 16 in every run
# (bench/RESULTS.md). Shorter sequences (the AR sampler's first prefixes, tiny tests) take the
# plain computation, whose (B, H, L, L) scores are small there.
FLEX_MIN_LENGTH = 16


def backend(q: torch.Tensor, softcap: float | None) -> str:
    """sdpa | math | flash-attn | flex for these inputs, from module constants only: it runs
    inside compiled traces, where an import attempt is a graph break."""
    if softcap is None:
        return "sdpa"
    if not _on_cuda(q) or q.shape[-2] < FLEX_MIN_LENGTH:
        return "math"
    if _FLASH2 is not None and q.dtype in (torch.bfloat16, torch.float16):
        return "flash-attn"
    return "flex"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float | None,
              causal: bool) -> torch.Tensor:
    """Scaled dot-product attention with logit soft-capping, (B, H, L, hd) x3 -> (B, H, L, hd),
    through ``backend``'s choice (logged once)."""
    name = backend(q, softcap)
    if name == "sdpa":
        _log_backend("sdpa (no softcap)")
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if name == "math":
        _log_backend(f"math (q k^T, softcap={softcap}, softmax) on {q.device.type}")
        return math_attention(q, k, v, softcap, causal)
    if name == "flash-attn":
        _log_backend(f"flash-attn softcap={softcap}")
        out = _FLASH2(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                      softcap=softcap)  # flash-attn takes and returns (B, L, H, hd)
        return out.transpose(1, 2)
    if not torch.compiler.is_compiling():  # the description is a string built in Python
        _log_backend(f"flex_attention softcap={softcap} ({q.dtype}), "
                     f"{flex_blocks.describe(q.shape[-1], q.dtype)}")
    mask = _causal_block_mask(q.shape[-2], q.device) if causal else None
    return _flex_attention()(q, k, v, score_mod=softcap_score_mod(softcap), block_mask=mask,
                             kernel_options=flex_blocks.kernel_options(q.shape[-1], q.dtype))


def prepare_softcap(softcap: float) -> None:
    """Make the cap's score_mod (which registers the approximate tanh's lowering) outside any
    compiled trace: a cap first met inside one gets inductor's "missing lowering" error.
    Called when a network with this cap is built."""
    softcap_score_mod(softcap)


def softcap_score_mod(softcap: float) -> Callable:
    """The FlexAttention score_mod ``s -> softcap·tanh(s / softcap)``, one object per cap, its
    tanh ``approx_tanh.tanh_approx``: the one-instruction ``tanh.approx.f32`` in generated
    CUDA kernels (what the paper's flash-attn kernel evaluates), with the ``1 - tanh²``
    derivative (+7.1% on the train step at B = 32 over ``2·sigmoid(2x) - 1``, one H200)."""
    if softcap not in _score_mods:
        if not torch.compiler.is_compiling():  # inside a trace the lowering must already exist
            approx_tanh.register_lowering()
        inverse, tanh = 1.0 / softcap, approx_tanh.tanh_approx

        def capped(score, b, h, q_idx, kv_idx):
            return softcap * tanh(score * inverse)

        _score_mods[softcap] = capped
    return _score_mods[softcap]
