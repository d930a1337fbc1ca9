"""FlashAttention-4 wrapper (models/flash4.py): the custom ops' wiring, its selection, and the
real kernels on a GPU that has them.

On the CPU the FA4 entry points are replaced by a float64 implementation of the same contract
(forward -> out and the softmax's log-normaliser; backward from out, dout and lse, written out
by hand, not by autograd), so the tests check what our code does around the kernels: layouts,
argument order, which saved tensors reach the backward, the fake shapes torch.compile traces.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from models import dit, flash4
from models.dit import math_attention
from tests.helpers import assert_matches_float64_attention, bf16_attention_case


def reference_kernels():
    """FA's contract in (B, L, H, hd), float64, the backward by the flash-attention formulas."""
    def capped_scores(q, k, softcap):
        s = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
        return softcap * torch.tanh(s / softcap), s

    def causal_fill(x, causal):
        if not causal:
            return x
        keep = torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device).tril()
        return x.masked_fill(~keep, float("-inf"))

    def fwd(q, k, v, causal, softcap):
        capped, _ = capped_scores(q, k, softcap)
        capped = causal_fill(capped, causal)
        lse = torch.logsumexp(capped, dim=-1)  # (B, H, L)
        p = torch.exp(capped - lse[..., None])
        # FA returns a contiguous (B, L, H, hd) output and a float32 lse
        return torch.einsum("bhlm,bmhd->blhd", p, v).contiguous(), lse.float()

    def bwd(q, k, v, out, dout, lse, causal, softcap):
        capped, raw = capped_scores(q, k, softcap)
        p = torch.exp(causal_fill(capped, causal) - lse.double()[..., None])
        dv = torch.einsum("bhlm,blhd->bmhd", p, dout)
        dp = torch.einsum("blhd,bmhd->bhlm", dout, v)
        delta = (dout * out).sum(-1).transpose(1, 2)[..., None]  # (B, H, L, 1)
        ds = p * (dp - delta) * (1 - torch.tanh(raw / softcap) ** 2) / math.sqrt(q.shape[-1])
        dq = torch.einsum("bhlm,bmhd->blhd", ds, k)
        dk = torch.einsum("bhlm,blhd->bmhd", ds, q)
        # FA's gradients are laid out as its inputs (torch.empty_like)
        return tuple(torch.empty_like(x).copy_(g) for x, g in ((q, dq), (k, dk), (v, dv)))

    return fwd, bwd


@pytest.fixture
def reference(monkeypatch):
    monkeypatch.setattr(flash4, "_kernels", reference_kernels)


def inputs(causal_len=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, causal_len, 8, generator=gen, dtype=torch.float64) * 6
               for _ in range(3))  # scaled: logits beyond the cap, so the cap matters
    return q, k, v, torch.randn(2, 3, causal_len, 8, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("causal", [False, True])
def test_wrapper_matches_math_attention_and_its_autograd(reference, causal):
    q, k, v, grad = inputs()
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = math_attention(*ref_in, 50.0, causal)
    ref.backward(grad)
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    out = flash4.attention(*(x.transpose(1, 2) for x in ins), 50.0, causal).transpose(1, 2)
    out.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for mine, theirs in zip(ins, ref_in):  # the backward reads lse in float32, as FA's does
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-6,
                                   atol=1e-6 * theirs.grad.abs().max().item())
    # the cap changed the result: without it the same inputs give another output
    assert (math_attention(q, k, v, None, causal) - ref.detach()).abs().max() > 1e-3


def test_custom_ops_pass_torch_library_checks(reference):
    q, k, v, grad = inputs(causal_len=16)
    args = tuple(x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    torch.library.opcheck(flash4._forward, (*args, 50.0, False))
    out, lse = flash4._forward(*(a.detach() for a in args), 50.0, False)
    torch.library.opcheck(flash4._backward, (grad.transpose(1, 2).contiguous(), *(
        a.detach() for a in args), out, lse, 50.0, False))


def test_compiled_wrapper_traces_the_fake_shapes_and_matches_eager(reference):
    q, k, v, grad = inputs(causal_len=16)

    def run(fn):
        ins = [x.clone().transpose(1, 2).requires_grad_() for x in (q, k, v)]
        out = fn(*ins)
        out.backward(grad.transpose(1, 2))
        return out.detach(), [x.grad for x in ins]

    def call(a, b, c):
        return flash4.attention(a, b, c, 50.0, False) * 2

    eager = run(call)
    compiled = run(torch.compile(call, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0])
    for x, y in zip(compiled[1], eager[1]):
        torch.testing.assert_close(x, y)


def test_flash_attn_4_alone_is_not_taken_for_flash_attn_2(tmp_path, monkeypatch):
    """flash-attn-4 installs ``flash_attn/cute`` without ``flash_attn/__init__.py``: a
    namespace package with no version or flash_attn_func (this crashed the backend choice)."""
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    dit._flash_attn_softcap.cache_clear()
    try:
        assert dit._flash_attn_softcap() is None
        assert flash4._installed()
    finally:
        dit._flash_attn_softcap.cache_clear()


def test_supports_needs_the_package_a_cuda_tensor_and_half_precision(monkeypatch):
    monkeypatch.setattr(flash4, "INSTALLED", True)
    assert not flash4.supports(torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16))  # CPU tensor
    monkeypatch.setattr(flash4, "INSTALLED", False)
    assert not flash4.supports(torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16))


needs_fa4 = pytest.mark.skipif(
    not (torch.cuda.is_available()
         and flash4.supports(torch.empty(0, device="cuda", dtype=torch.bfloat16))),
    reason="needs flash-attn-4 and an SM90+ GPU")


@needs_fa4
@pytest.mark.parametrize("causal", [False, True])
def test_fa4_kernels_on_the_gpu_match_float64_math(causal):
    """The real kernels against float64 math on the same bf16-rounded inputs."""
    ins, ref_in, grad = bf16_attention_case()
    out = flash4.attention(*(x.transpose(1, 2) for x in ins), 50.0, causal).transpose(1, 2)
    out.backward(grad)
    assert_matches_float64_attention(out, ins, ref_in, grad, 50.0, causal)
