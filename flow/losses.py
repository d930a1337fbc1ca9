"""The FLM denoiser objective (docs/math.md §3) and its fused output-layer cross-entropy.

The plain path materialises the (B, L, V) logits. ``training.fused_ce`` picks a
fused linear + cross-entropy instead, which never holds more than one chunk of
positions' logits:

* ``chunked``: our own fused CE (any device): for the masked mean (the FLM loss)
  ``MeanLinearCrossEntropy``, gradients formed in the forward over chunks of ~10k rows
  (each chunk's softmax/gradient pass a Triton kernel of ours on CUDA, flow/ce_triton.py,
  PyTorch elsewhere; 1.7x faster than liger's forward + backward at B·L = 32,768,
  V = 50,304 on an H200 with round 6's compiled pass, bench/components.py);
  per-token losses (learnable loss weighting) through ``ChunkedLinearCrossEntropy``,
  logits recomputed in backward;
* ``liger``: liger-kernel's ``LigerFusedLinearCrossEntropyLoss`` (CUDA, Triton):
  the masked mean in one pass (gradients formed in the forward), or per-token
  losses with ``reduction='none'`` under learnable loss weighting (logged);
* ``cce``: cut-cross-entropy's ``linear_cross_entropy`` (CUDA, Triton), per-token;
* ``none``: the plain path;
* ``auto``: ``chunked``, the fastest we measured on every device.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F

from flow.fused import fused_kernel, fused_kernels_on
from runtime import config as utils

log = logging.getLogger(__name__)

FUSED_CE_CHOICES = ("auto", "liger", "cce", "chunked", "none")
CHUNK_ELEMENTS = 2**28  # logits per chunk of the chunked CE (1 GiB in float32)
IGNORE_INDEX = -100  # target id the fused kernels skip (masked positions)
_PACKAGES = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}
_PIP = {"liger": "liger-kernel==0.8.5", "cce": "cut-cross-entropy==25.1.1"}  # tested versions


def masked_token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L) values over valid tokens."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def denoiser_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[x] per token: (B, L, V), (B, L) -> (B, L), float32 (float64 logits
    stay float64)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
    return ce.view_as(tokens)


def weighted_loss(per_token: torch.Tensor, log_weight: torch.Tensor | None) -> torch.Tensor:
    """Learnable loss weighting ``exp(-w)·loss + w`` with w per sequence (B,)."""
    if log_weight is None:
        return per_token
    w = log_weight.float()[:, None]
    return torch.exp(-w) * per_token + w


# ---- backend choice ---------------------------------------------------------------
def fused_ce_available(backend: str) -> bool:
    """Whether the package behind ``liger`` / ``cce`` is importable (always true otherwise)."""
    package = _PACKAGES.get(backend)
    return package is None or importlib.util.find_spec(package) is not None


def check_fused_ce(choice: str) -> None:
    """Config-time check of ``training.fused_ce`` (before any work): ConfigError if bad."""
    if choice not in FUSED_CE_CHOICES:
        raise utils.ConfigError(f"training.fused_ce={choice!r} is not one of {FUSED_CE_CHOICES}")
    if choice in _PACKAGES and not fused_ce_available(choice):
        raise utils.ConfigError(
            f"training.fused_ce={choice} needs the package {_PACKAGES[choice]!r}, which is not "
            f"installed: `pip install {_PIP[choice]}` (needs triton) or set "
            "training.fused_ce=auto|chunked")


def resolve_fused_ce(choice: str, device: torch.device, per_token_weights: bool) -> str:
    """The backend that ``choice`` means on ``device``: liger | cce | chunked | none.

    ``per_token_weights``: the loss weights tokens unequally beyond the mask
    (learnable loss weighting); liger then runs with ``reduction='none'`` (logged)
    instead of its masked-mean fast path.
    """
    check_fused_ce(choice)
    if choice in _PACKAGES and device.type != "cuda":
        raise utils.ConfigError(f"training.fused_ce={choice} runs on CUDA only (device "
                                f"{device}): set training.fused_ce=auto or chunked")
    if choice == "auto":
        choice = "chunked"
    if choice == "liger" and per_token_weights:
        log.info("training.fused_ce: liger with reduction='none' (per-token losses for the "
                 "learnable loss weighting; gradients recomputed in backward)")
    return choice


# ---- the chunked fused linear + cross-entropy ----------------------------------------------
def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """(n, D) -> float32 (or float64) logits (n, V), the matmul in ``dtype``."""
    out = F.linear(h.to(dtype), weight, None if bias is None else bias.to(dtype))
    return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token ``CE(h @ Wᵀ + b, x)`` over chunks of rows, recomputing logits in backward.

    Forward keeps only the logsumexp per row (N,); backward recomputes each chunk's
    softmax to form dlogits = (softmax - onehot)·grad and from it grad_h, grad_W,
    grad_b. ``dtype`` is the matmul precision (the autocast dtype under bf16 mixed
    precision, as the plain ``nn.Linear`` would use); softmax and sums are float32
    (float64 for float64 inputs).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
        w = weight.to(dtype)
        losses = []
        lses = []
        for start in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[start:start + chunk], w, bias, dtype)
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, targets[start:start + chunk, None]).squeeze(1)
            losses.append(lse - target_logit)
            lses.append(lse)
        ctx.save_for_backward(hidden, weight, bias, targets, torch.cat(lses))
        ctx.chunk, ctx.dtype = chunk, dtype
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        w = weight.to(dtype)
        acc = lse.dtype
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_b = (torch.zeros(weight.shape[0], dtype=acc, device=weight.device)
                  if bias is not None else None)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows].to(dtype)
            logits = _chunk_logits(h, w, bias, dtype)
            d = torch.exp(logits - lse[rows, None])  # softmax
            d.scatter_add_(1, targets[rows, None],
                           torch.full_like(d[:, :1], -1.0))  # minus the one-hot target
            d = d * grad_loss[rows, None].to(d.dtype)
            if grad_b is not None:
                grad_b += d.sum(0)
            d = d.to(dtype)
            if grad_h is not None:
                grad_h[rows] = (d @ w).to(hidden.dtype)
            grad_w += (d.T @ h).to(acc)
        grad_w = grad_w.to(weight.dtype) if ctx.needs_input_grad[1] else None
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype) if ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None, None, None


@fused_kernel
def chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor,
                        row_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of the mean CE: per-row ``lse - logit[target]`` (float32, float64 for float64
    logits) and ``dlogits = (softmax - onehot)·row_weight`` in the logits' dtype. Written as one
    reduction and one elementwise pass so that ``torch.compile`` fuses it (two reads of the
    logits, one write of dlogits, nothing float32 of size (n, V) in memory)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    lse = torch.logsumexp(x, dim=-1)
    target_logit = x.gather(1, targets[:, None]).squeeze(1)
    hit = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    d = (torch.exp(x - lse[:, None]) - hit.to(x.dtype)) * row_weight[:, None].to(x.dtype)
    return lse - target_logit, d.to(logits.dtype)


CE_KERNELS = ("triton", "compiled")
CE_KERNEL = "triton"  # bench/train_step.py --ce-kernels measures each


def chunk_losses_and_grad(logits: torch.Tensor, targets: torch.Tensor,
                          row_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunk_loss_and_grad``'s results; on CUDA (bf16 / fp16 / fp32 logits, fused kernels
    on) from flow/ce_triton.py's one-read kernel (``CE_KERNEL = "triton"``), which writes
    dlogits over ``logits`` (so the returned dlogits may be ``logits`` itself)."""
    if (CE_KERNEL == "triton" and fused_kernels_on(logits.device)
            and logits.dtype != torch.float64):
        from flow import ce_triton  # here: Triton is imported on CUDA machines only

        return ce_triton.losses_and_grad_inplace(logits, targets, row_weight)
    return chunk_loss_and_grad(logits, targets, row_weight)


class MeanLinearCrossEntropy(torch.autograd.Function):
    """``Σ_n w_n·CE(h_n @ Wᵀ + b, x_n)`` over chunks of rows, gradients formed in the forward.

    Each chunk's logits are computed once (in ``dtype``, the autocast dtype under mixed
    precision, as the plain ``nn.Linear`` would), turned into the chunk's losses and
    ``dlogits = (softmax - onehot)·w`` (``chunk_loss_and_grad``), and multiplied straight into
    grad_h, grad_W (accumulated in float32) and grad_b; backward only scales them by the
    upstream scalar. Three V-sized products per row instead of the four of a recompute in
    backward, and chunks large enough for the products to run at full speed. For a weighted
    sum / mean (the weights ``w`` are known in the forward); per-token losses with per-token
    upstream gradients (learnable loss weighting) go through ``ChunkedLinearCrossEntropy``.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, row_weight: torch.Tensor, chunk: int,
                dtype: torch.dtype) -> torch.Tensor:
        w = weight.to(dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows].to(dtype)
            logits = F.linear(h, w, None if bias is None else bias.to(dtype))
            losses, d = chunk_losses_and_grad(logits, targets[rows], row_weight[rows])
            total += (losses.to(acc) * row_weight[rows].to(acc)).sum()
            del logits
            if grad_h is not None:
                grad_h[rows] = (d @ w).to(hidden.dtype)
            if grad_w is not None and grad_b is not None:
                # grad_b = Σ_rows d rides on grad_W's product as a column of ones beside h:
                # one pass over d instead of a second one for the column sums
                both = (d.T @ with_ones_column(h)).to(acc)
                grad_w += both[:, :h.shape[1]]
                grad_b += both[:, h.shape[1]]
            elif grad_w is not None:
                grad_w += (d.T @ h).to(acc)
            elif grad_b is not None:
                grad_b += d.sum(0, dtype=acc)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_total
        out_h = None if grad_h is None else grad_h * scale.to(grad_h.dtype)
        out_w = None if grad_w is None else (grad_w * scale.to(grad_w.dtype)).to(weight_dtype)
        out_b = None if grad_b is None else (grad_b * scale.to(grad_b.dtype)).to(bias_dtype)
        return out_h, out_w, out_b, None, None, None, None


ONES_PAD = 8  # columns appended to h (a one, then zeros): 16-byte aligned rows in bf16


def with_ones_column(h: torch.Tensor) -> torch.Tensor:
    """(n, D) -> (n, D + ONES_PAD): h, a column of ones, zeros (``dᵀ @`` it gives Σ d in
    column D)."""
    extra = h.new_zeros(h.shape[0], ONES_PAD)
    extra[:, 0] = 1
    return torch.cat([h, extra], dim=1)


MEAN_CHUNK_ELEMENTS = 2**29  # logits per chunk of MeanLinearCrossEntropy (1 GiB in bf16)


@torch.compiler.disable
def chunked_linear_cross_entropy_mean(hidden: torch.Tensor, weight: torch.Tensor,
                                      bias: torch.Tensor | None, tokens: torch.Tensor,
                                      mask: torch.Tensor, chunk_tokens: int | None = None,
                                      ) -> torch.Tensor:
    """``masked_token_mean(CE(hidden @ weightᵀ + bias, tokens), mask)`` as one float32 scalar
    (float64 for float64 inputs), through ``MeanLinearCrossEntropy``: (B, L, D), (V, D), (V,),
    (B, L), (B, L) -> (). Outside torch.compile (its chunk kernel is compiled on its own)."""
    chunk = chunk_tokens or max(1, MEAN_CHUNK_ELEMENTS // weight.shape[0])
    dtype = matmul_dtype(hidden, weight)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    m = mask.flatten().to(acc)
    row_weight = m / m.sum().clamp_min(1.0)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return MeanLinearCrossEntropy.apply(hidden.flatten(0, 1), weight, bias,
                                            tokens.flatten(), row_weight, chunk, dtype)


def matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would multiply in: autocast's, or the promoted one."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                 bias: torch.Tensor | None, tokens: torch.Tensor,
                                 chunk_tokens: int | None = None) -> torch.Tensor:
    """Per-token ``CE(hidden @ weightᵀ + bias, tokens)``: (B, L, D), (V, D), (V,), (B, L) -> (B, L).

    Same value and gradients as ``denoiser_cross_entropy(linear(hidden), tokens)``
    without the (B, L, V) logits; ``chunk_tokens`` rows per chunk (default: as many
    as fit ``CHUNK_ELEMENTS`` logits).
    """
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    dtype = matmul_dtype(hidden, weight)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        ce = ChunkedLinearCrossEntropy.apply(hidden.flatten(0, 1), weight, bias,
                                             tokens.flatten(), chunk, dtype)
    return ce.view(tokens.shape)


# ---- the Triton backends (CUDA) ----------------------------------------------------------
CCE_PAD = 16  # cut-cross-entropy has no bias: it rides on a padded column of ones


@torch.compiler.disable
def cce_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token CE through cut-cross-entropy: (B, L, D), (V, D), (V,), (B, L) -> (B, L) float32.

    cut-cross-entropy 25.1.1 takes no bias: ``[h, 1, 0…] @ [W, b, 0…]ᵀ`` carries it
    (padded to a multiple of ``CCE_PAD`` columns). ``filter_eps=None``: no gradient
    entries are dropped, so the gradient is the exact one.
    """
    from cut_cross_entropy import linear_cross_entropy

    dtype = matmul_dtype(hidden, weight)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        h, w = hidden.to(dtype), weight.to(dtype)
        if bias is not None:
            pad = -(weight.shape[1] + 1) % CCE_PAD
            h = torch.cat([h, h.new_ones(*h.shape[:-1], 1), h.new_zeros(*h.shape[:-1], pad)], -1)
            w = torch.cat([w, bias.to(dtype)[:, None], w.new_zeros(w.shape[0], pad)], -1)
        ce = linear_cross_entropy(h, w, tokens, reduction="none", filter_eps=None)
    return ce.float().view(tokens.shape)


_LIGER_LOSSES: dict[str, torch.nn.Module] = {}


@torch.compiler.disable
def liger_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """CE through liger-kernel's fused linear cross-entropy (gradients accumulated in float32).

    ``mask`` (B, L) given: the mean over tokens with the mask set, a scalar, equal to
    ``masked_token_mean(per-token CE, mask)`` (masked positions get the ignore index;
    liger's fast path, gradients formed in the forward). ``mask=None``: per-token
    CE (B, L) (``reduction='none'``: liger recomputes in backward to apply
    per-token upstream gradients, for the learnable loss weighting).
    """
    reduction = "none" if mask is None else "mean"
    if reduction not in _LIGER_LOSSES:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )

        _LIGER_LOSSES[reduction] = LigerFusedLinearCrossEntropyLoss(
            ignore_index=IGNORE_INDEX, reduction=reduction, accum_dtype=torch.float32)
    dtype = matmul_dtype(hidden, weight)
    targets = tokens if mask is None else torch.where(mask.bool(), tokens, IGNORE_INDEX)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        loss = _LIGER_LOSSES[reduction](weight.to(dtype), hidden.flatten(0, 1).to(dtype),
                                        targets.flatten(),
                                        None if bias is None else bias.to(dtype))
    return loss.float() if mask is not None else loss.float().view(tokens.shape)


def fused_mean_cross_entropy(backend: str, hidden: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, tokens: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
    """``masked_token_mean(per-token CE, mask)`` through ``backend``, as one scalar: the
    gradients-in-forward paths of ``chunked`` and ``liger``, else the per-token path."""
    if backend == "chunked":
        return chunked_linear_cross_entropy_mean(hidden, weight, bias, tokens, mask)
    if backend == "liger":
        return liger_cross_entropy(hidden, weight, bias, tokens, mask)
    return masked_token_mean(fused_token_cross_entropy(backend, hidden, weight, bias, tokens),
                             mask)


def fused_token_cross_entropy(backend: str, hidden: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token CE (B, L) through ``backend`` from the output layer's input (B, L, D).

    ``hidden``: the modulated, normalised states that the output linear (weight (V, D),
    bias (V,)) maps to logits; the DiT passes them over its padded vocabulary (V' rows, pads
    zero with biases at models.dit.PAD_LOGIT, which carry no probability: the same CE).
    """
    if backend == "chunked":
        return chunked_linear_cross_entropy(hidden, weight, bias, tokens)
    if backend == "cce":
        return cce_linear_cross_entropy(hidden, weight, bias, tokens)
    if backend == "liger":
        return liger_cross_entropy(hidden, weight, bias, tokens, mask=None)
    if backend == "none":
        return denoiser_cross_entropy(F.linear(hidden, weight, bias), tokens)
    raise ValueError(f"fused_token_cross_entropy: unknown backend {backend!r}")
