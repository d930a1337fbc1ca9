"""tanh as one GPU instruction inside compiled kernels: ``torch.ops.flm.tanh_approx``.

flash-attn (2 and 3, the paper's attention kernel) caps attention logits with
``cutlass::fast_tanh``, which on SM75+ is the PTX instruction ``tanh.approx.f32``
(one MUFU operation, relative error about 2^-11), and takes the backward's derivative
as ``1 - tanh²`` of that value. Triton's ``tanh`` is a libdevice routine of a few dozen
instructions, evaluated for every (query, key) score in FlexAttention's forward and
again in its backward; the same function on the instruction makes the soft-capped
attention as cheap as the paper's kernel makes it (bench/components.py times it).

``tanh_approx(x)`` is a custom op so that torch.compile keeps it as one node, which the
inductor lowering registered here turns into

* ``tanh.approx.f32`` (Triton inline assembly) in CUDA kernels;
* the exact ``tanh`` in any other kernel (CPU C++), and
* the exact ``torch.tanh`` when run eagerly (no kernel of ours to put the
  instruction in).

Its gradient is ``grad · (1 - y²)`` from the op's own output ``y``, as flash-attn's
backward takes it. Float32 in and out inside CUDA kernels (other dtypes are computed in
float32 there and rounded back).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["register_lowering", "tanh_approx"]


@torch.library.custom_op("flm::tanh_approx", mutates_args=())
def tanh_approx(x: torch.Tensor) -> torch.Tensor:
    """tanh(x); in CUDA kernels that inductor generates, the one-instruction approximation."""
    return torch.tanh(x)


@tanh_approx.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)


def _backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    (y,) = ctx.saved_tensors
    return grad * (1 - y * y)


tanh_approx.register_autograd(_backward, setup_context=_setup_context)


@tanh_approx.register_vmap
def _(info, in_dims, x):  # elementwise: the batched op is the op on the batched tensor
    return tanh_approx(x), in_dims[0]


PTX = "tanh.approx.f32 $0, $1;"


@functools.cache
def register_lowering() -> None:
    """Teach inductor the op, once per process (importing this module imports no inductor:
    2 s). Call it before compiling anything that uses the op, outside any compiled trace
    (speed.attention.prepare_softcap does when a block is built)."""
    # inductor costs seconds to import: on use only
    from torch._inductor.lowering import make_pointwise
    from torch._inductor.lowering import register_lowering as inductor_lowering
    from torch._inductor.virtualized import ops

    def on_cuda(value):
        as_float = ops.to_dtype(value, torch.float32)
        return ops.inline_asm_elementwise(as_float, asm=PTX, constraints="=r,r",
                                          dtype=torch.float32, is_pure=True, pack=1)

    @inductor_lowering(torch.ops.flm.tanh_approx.default)
    def _lower(x):
        device = x.get_device()
        body = on_cuda if device is not None and device.type == "cuda" else ops.tanh
        return make_pointwise(body)(x)
