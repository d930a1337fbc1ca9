"""The soft-capped attention's CUDA kernels (FlexAttention with the approx-tanh score_mod)
against float64 math. Run where there is a GPU (bench/gpu_round.sh stage cudatests); skipped
on the CPU, where tests/test_dit_conventions.py checks the same score_mod and the op's CPU
kernel."""

from __future__ import annotations

import pytest
import torch

from speed import attention
from tests.helpers import assert_matches_float64_attention, bf16_attention_case


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_flex_softcap_kernels_on_the_gpu_use_the_instruction_and_match_float64(causal):
    """Forward and gradients of the model's attention on CUDA (compiled FlexAttention, the
    approx-tanh score_mod) against float64 math on the same bf16-rounded inputs; the generated
    kernels contain tanh.approx.f32 (so the lowering, not an exact tanh, is what ran)."""
    from torch._inductor.utils import run_and_get_code

    ins, ref_in, grad = bf16_attention_case()
    torch._dynamo.reset()
    attention._compiled_flex.clear()

    def run():
        out = attention.attention(*ins, 50.0, causal)
        out.backward(grad)
        return out

    out, sources = run_and_get_code(run)
    assert any("tanh.approx.f32" in src for src in sources), "no kernel has the instruction"
    # (the instruction's 2^-11 relative error on the capped score is below bf16's rounding)
    assert_matches_float64_attention(out, ins, ref_in, grad, 50.0, causal)
