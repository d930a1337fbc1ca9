"""The soft-capped attention's CUDA kernels (FlexAttention with the approx-tanh score_mod)
against float64 math. Run where there is a GPU (bench/gpu_round.sh stage cudatests); skipped
on the CPU, where tests/test_dit_conventions.py checks the same score_mod and the op's CPU
kernel."""

from __future__ import annotations

import re

import pytest
import torch

from speed import attention, flex_blocks
from speed.compile import compile_options
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


@pytest.mark.cuda
def test_measured_flex_block_sizes_are_the_ones_compiled_and_are_right():
    """Where speed.flex_blocks has block sizes for this GPU (bf16, head size 64), compiling
    the seam's FlexAttention without autotuning (as compile_options then does) generates
    kernels with those sizes, and forward and gradients match float64 math."""
    from torch._inductor.utils import run_and_get_code

    measured = flex_blocks.kernel_options(64, torch.bfloat16)
    if measured is None:
        pytest.skip(f"no block sizes measured for compute capability {flex_blocks.capability()}")
    ins, ref_in, grad = bf16_attention_case()
    torch._dynamo.reset()
    attention._compiled_flex.clear()
    assert compile_options()["max_autotune"] is False

    def run():
        out = attention.attention(*ins, 50.0, False)
        out.backward(grad)
        return out

    out, sources = run_and_get_code(run)
    code = "\n".join(sources)
    for key, value in measured.items():
        name = key.split("_", 1)[1]
        if name.startswith("BLOCK"):
            assert re.search(rf"\b{name} : tl.constexpr = {value}\b", code), (key, value)
    assert_matches_float64_attention(out, ins, ref_in, grad, 50.0, False)
