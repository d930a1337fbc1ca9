"""The fused CE's per-chunk kernel in Triton (CUDA): losses and dlogits written over the logits.

``mean_linear_cross_entropy`` (speed/cross_entropy.py) turns each chunk of logits (n, V) into
per-row losses ``lse - logit[target]`` and ``dlogits = (softmax - onehot)·w``. Compiled by
inductor, that pass took 1.2 ms per 10,672 x 50,304 bf16 chunk on an H200, about 2.7 TB/s over
the three passes of memory it makes (bench/results/profile_h200_round10.txt). Here one program
owns one row: a first sweep keeps a running max and
sum of exponentials (the online softmax), a second sweep re-reads the row, which at 100 KB per
row and one row per program in flight is still in L2, and writes dlogits over the logits
themselves. Memory sees one read and one write of the chunk, and no second (n, V) buffer.

Imported only on CUDA (Triton is not installed with the CPU wheel); ``chunk_losses_and_grad``
in speed/cross_entropy.py picks it. tests/test_fused_kernels.py compares it with float64 on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # columns per sweep step
NUM_WARPS = 8
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _rows_kernel(logits_ptr, targets_ptr, weights_ptr, losses_ptr, stride, n_cols,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = (running_sum * tl.exp(running_max - new_max)
                       + tl.sum(tl.exp(x - new_max), axis=0))
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target = tl.load(targets_ptr + row)
    target_logit = tl.load(base + target).to(tl.float32)
    weight = tl.load(weights_ptr + row).to(tl.float32)
    tl.store(losses_ptr + row, lse - target_logit)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < n_cols
        x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
        d = (tl.exp(x - lse) - (cols == target).to(tl.float32)) * weight
        tl.store(base + cols, d.to(logits_ptr.dtype.element_ty), mask=inside)


def losses_and_grad_inplace(logits: torch.Tensor, targets: torch.Tensor,
                            row_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) CUDA logits (bf16 / fp16 / fp32, unit column stride), targets (n,), row weights
    (n,) -> (per-row losses float32 (n,), dlogits): dlogits is ``logits`` itself, overwritten
    with ``(softmax - onehot)·w`` in its dtype."""
    if logits.dtype not in DTYPES or logits.stride(1) != 1 or not logits.is_cuda:
        raise ValueError(f"logits {logits.dtype} strides {logits.stride()} on "
                         f"{logits.device}: expected CUDA {DTYPES} with unit column stride")
    n, n_cols = logits.shape
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _rows_kernel[(n,)](logits, targets.contiguous(), row_weight.float().contiguous(),
                           losses, logits.stride(0), n_cols, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return losses, logits
