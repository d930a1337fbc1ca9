"""The soft-capped attention's CUDA kernels (FlexAttention with the approx-tanh score_mod)
against float64 math. Run where there is a GPU (bench/gpu_round.sh stage cudatests); skipped
on the CPU, where tests/test_dit_conventions.py checks the same score_mod's forms and the
op's CPU kernel."""

from __future__ import annotations

import pytest
import torch

from models import dit
from models.dit import math_attention

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("causal", [False, True])
def test_flex_softcap_kernels_on_the_gpu_use_the_instruction_and_match_float64(causal):
    """Forward and gradients of the model's attention on CUDA (compiled FlexAttention, the
    approx-tanh score_mod) against float64 math on the same bf16-rounded inputs; the generated
    kernels contain tanh.approx.f32 (so the lowering, not an exact tanh, is what ran)."""
    from torch._inductor.utils import run_and_get_code

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, h, length, hd = 2, 4, 512, 64
    q, k, v = (torch.randn(b, h, length, hd, device="cuda", generator=gen) * 4 for _ in range(3))
    grad = torch.randn(b, h, length, hd, device="cuda", generator=gen)
    ins = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    ref_in = [x.detach().double().requires_grad_() for x in ins]  # the same rounded inputs
    torch._dynamo.reset()
    dit._compiled_flex = None

    def run():
        out = dit.attention(*ins, 50.0, causal)
        out.backward(grad.bfloat16())
        return out

    out, sources = run_and_get_code(run)
    assert any("tanh.approx.f32" in src for src in sources), "no kernel has the instruction"
    ref = math_attention(*ref_in, 50.0, causal)
    ref.backward(grad.bfloat16().double())
    # bf16 output and gradients: a few units of bf16's 2^-8 relative rounding of the largest
    # (the instruction's 2^-11 relative error on the capped score is below that)
    for mine, theirs in [(out, ref)] + [(x.grad, y.grad) for x, y in zip(ins, ref_in)]:
        err = (mine.double() - theirs).abs().max() / theirs.abs().max()
        assert err < 2e-2, err

