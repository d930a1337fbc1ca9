"""The output layer's linear + cross-entropy, fused over chunks of rows: one seam,
``linear_cross_entropy``.

The plain form (``plain_linear_cross_entropy``) materialises the (N, V) logits. The chunked
form never holds more than one chunk of rows' logits:

* ``mean_linear_cross_entropy`` (an operator) for a weighted sum ``Σ_n w_n·CE_n`` (the FLM
  loss's masked mean): gradients formed in the forward over chunks of ~10k rows, each chunk's
  softmax / gradient pass the Triton kernel of speed/ce_triton.py on CUDA (plain PyTorch
  elsewhere); 1.7x faster than liger-kernel's fused CE forward + backward at B·L = 32,768,
  V = 50,304 on an H200 (bench/components.py);
* ``ChunkedLinearCrossEntropy`` for per-token losses (learnable loss weighting), logits
  recomputed in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speed.options import SpeedOptions

CHUNK_ELEMENTS = 2**28  # logits per chunk of the per-token chunked CE (1 GiB in float32)


def matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would multiply in: autocast's, or the promoted one."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def plain_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor | None, tokens: torch.Tensor,
                               weights: torch.Tensor | None = None) -> torch.Tensor:
    """``CE(hidden @ Wᵀ + b, tokens)`` per token (B, L), float32 (float64 for float64 logits);
    with ``weights`` (B, L) the scalar ``Σ weights·CE``. Materialises the logits."""
    logits = F.linear(hidden, weight, bias)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
    ce = ce.view_as(tokens)
    return ce if weights is None else (ce * weights.to(ce.dtype)).sum()


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         tokens: torch.Tensor, weights: torch.Tensor | None,
                         options: SpeedOptions) -> torch.Tensor:
    """``plain_linear_cross_entropy``'s value, through ``options.fused_ce``: (B, L, D),
    (V, D), (V,), (B, L)[, (B, L)] -> (B, L) or ()."""
    if options.fused_ce == "none":
        return plain_linear_cross_entropy(hidden, weight, bias, tokens, weights)
    fused = options.fused_on(hidden.device)
    if weights is None:
        return chunked_linear_cross_entropy(hidden, weight, bias, tokens)
    return chunked_linear_cross_entropy_sum(hidden, weight, bias, tokens, weights, fused)


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


def chunk_losses_and_grad(logits: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor,
                          fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunk_loss_and_grad``'s results; with ``fused`` (CUDA, bf16 / fp16 / fp32 logits) from
    speed/ce_triton.py's one-read kernel, which writes dlogits over ``logits`` (so the returned
    dlogits may be ``logits`` itself)."""
    if fused and logits.dtype != torch.float64:
        from speed import ce_triton  # Triton is installed with CUDA builds of torch only

        return ce_triton.losses_and_grad_inplace(logits, targets, row_weight)
    return chunk_loss_and_grad(logits, targets, row_weight)


# The weighted-sum CE as one operator: ``torch.compile`` keeps it whole in the compiled graph
# (an opaque call, run eagerly inside it) instead of breaking the graph around a Python
# autograd.Function, which made dynamo trace the network's frame twice at every start-up.
MEAN_CE_SCHEMA = ("(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
                  "Tensor row_weight, int chunk, ScalarType dtype, bool fused, bool need_h, "
                  "bool need_w, bool need_b) -> (Tensor, Tensor, Tensor, Tensor)")


def _mean_ce_outputs(hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype,
                     need_h: bool, need_w: bool, need_b: bool,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mean_linear_cross_entropy``'s outputs before its chunks fill them: the total and the
    accumulated grad_W, grad_b zeroed in float32 (float64 for float64 products), grad_h (written
    chunk by chunk) like ``hidden``; a gradient not asked for is empty (0,)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (torch.zeros((), dtype=acc, device=hidden.device),
            torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.zeros(weight.shape if need_w else (0,), dtype=acc, device=weight.device),
            torch.zeros(weight.shape[0] if need_b else 0, dtype=acc, device=weight.device))


@torch.library.custom_op("flm::mean_linear_cross_entropy", mutates_args=(), schema=MEAN_CE_SCHEMA)
def mean_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor | None, targets: torch.Tensor,
                              row_weight: torch.Tensor, chunk: int, dtype: torch.dtype,
                              fused: bool, need_h: bool, need_w: bool, need_b: bool,
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Σ_n w_n·CE(h_n @ Wᵀ + b, x_n)`` over chunks of rows, and its gradients, formed in the
    forward: (N, D), (V, D), (V,) | None, (N,), (N,) -> (total (), grad_h (N, D), grad_W (V, D),
    grad_b (V,)), each gradient of ``total`` and empty (0,) when its ``need_*`` is off.

    Each chunk's logits are computed once (in ``dtype``, the autocast dtype under mixed
    precision, as the plain ``nn.Linear`` would), turned into the chunk's losses and
    ``dlogits = (softmax - onehot)·w`` (``chunk_loss_and_grad``), and multiplied straight into
    grad_h, grad_W (accumulated in float32) and grad_b; the backward (``_mean_ce_backward``)
    only scales them by the upstream scalar. Three V-sized products per row instead of the four
    of a recompute in backward, and chunks large enough for the products to run at full speed.
    For a weighted sum / mean (the weights ``w`` are known in the forward); per-token losses
    with per-token upstream gradients (learnable loss weighting) go through
    ``ChunkedLinearCrossEntropy``."""
    total, grad_h, grad_w, grad_b = _mean_ce_outputs(hidden, weight, dtype, need_h, need_w,
                                                     need_b)
    acc = total.dtype
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows].to(dtype)
            logits = F.linear(h, w, b)
            losses, d = chunk_losses_and_grad(logits, targets[rows], row_weight[rows], fused)
            total += (losses.to(acc) * row_weight[rows].to(acc)).sum()
            del logits
            if need_h:
                grad_h[rows] = (d @ w).to(hidden.dtype)
            if need_w and need_b:
                # grad_b = Σ_rows d rides on grad_W's product as a column of ones beside h:
                # one pass over d instead of a second one for the column sums
                both = (d.T @ with_ones_column(h)).to(acc)
                grad_w += both[:, :h.shape[1]]
                grad_b += both[:, h.shape[1]]
            elif need_w:
                grad_w += (d.T @ h).to(acc)
            elif need_b:
                grad_b += d.sum(0, dtype=acc)
    return total, grad_h, grad_w, grad_b


@mean_linear_cross_entropy.register_fake
def _mean_ce_shapes(hidden, weight, bias, targets, row_weight, chunk, dtype, fused, need_h,
                    need_w, need_b):
    """The outputs' shapes and dtypes, for tracing: the operator's own allocation."""
    return _mean_ce_outputs(hidden, weight, dtype, need_h, need_w, need_b)


def _mean_ce_save(ctx, inputs, output) -> None:
    hidden, weight, bias, *_ = inputs
    _, grad_h, grad_w, grad_b = output
    ctx.mark_non_differentiable(grad_h, grad_w, grad_b)
    ctx.save_for_backward(grad_h, grad_w, grad_b)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.needs = inputs[-3:]


def _mean_ce_backward(ctx, grad_total, *_):
    """The forward's gradients times the upstream scalar, in the inputs' dtypes."""
    grads = []
    for grad, need, dtype in zip(ctx.saved_tensors, ctx.needs, ctx.dtypes):
        grads.append((grad * grad_total.to(grad.dtype)).to(dtype) if need else None)
    return (*grads, None, None, None, None, None, None, None, None)


mean_linear_cross_entropy.register_autograd(_mean_ce_backward, setup_context=_mean_ce_save)


ONES_PAD = 8  # columns appended to h (a one, then zeros): 16-byte aligned rows in bf16


def with_ones_column(h: torch.Tensor) -> torch.Tensor:
    """(n, D) -> (n, D + ONES_PAD): h, a column of ones, zeros (``dᵀ @`` it gives Σ d in
    column D)."""
    extra = h.new_zeros(h.shape[0], ONES_PAD)
    extra[:, 0] = 1
    return torch.cat([h, extra], dim=1)


MEAN_CHUNK_ELEMENTS = 2**29  # logits per chunk of mean_linear_cross_entropy (1 GiB in bf16)


def chunked_linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor,
                                     bias: torch.Tensor | None, tokens: torch.Tensor,
                                     weights: torch.Tensor, fused: bool,
                                     chunk_tokens: int | None = None) -> torch.Tensor:
    """``Σ weights·CE(hidden @ weightᵀ + bias, tokens)`` as one float32 scalar (float64 for
    float64 inputs), through ``mean_linear_cross_entropy``: (B, L, D), (V, D), (V,), (B, L),
    (B, L) -> (). ``fused``: the chunks' pass through the Triton kernel (CUDA)."""
    chunk = chunk_tokens or max(1, MEAN_CHUNK_ELEMENTS // weight.shape[0])
    grad = torch.is_grad_enabled()
    total, *_ = mean_linear_cross_entropy(
        hidden.flatten(0, 1), weight, bias, tokens.flatten(), weights.flatten(), chunk,
        matmul_dtype(hidden, weight), fused, grad and hidden.requires_grad,
        grad and weight.requires_grad, grad and bias is not None and bias.requires_grad)
    return total


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                 bias: torch.Tensor | None, tokens: torch.Tensor,
                                 chunk_tokens: int | None = None) -> torch.Tensor:
    """Per-token ``CE(hidden @ weightᵀ + bias, tokens)``: (B, L, D), (V, D), (V,), (B, L) -> (B, L).

    Same value and gradients as ``plain_linear_cross_entropy(hidden, weight, bias, tokens)``
    without the (B, L, V) logits; ``chunk_tokens`` rows per chunk (default: as many
    as fit ``CHUNK_ELEMENTS`` logits).
    """
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    dtype = matmul_dtype(hidden, weight)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        ce = ChunkedLinearCrossEntropy.apply(hidden.flatten(0, 1), weight, bias,
                                             tokens.flatten(), chunk, dtype)
    return ce.view(tokens.shape)
