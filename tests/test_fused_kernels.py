"""speed/'s compiled and hand-written forms give the plain results; the compile options of CUDA
machines are options this torch knows."""

import logging

import pytest
import torch

from flow.flow_map import Interval, flow_map_matching_loss, semigroup_loss
from flow.path import joint_gaussian_projection
from flow.schedule import AlphaGammaTable
from models.dit import DiT
from speed import SpeedOptions, flex_blocks
from speed import compile as speed_compile
from speed.compile import compile_loss, compile_options
from speed.cross_entropy import chunk_loss_and_grad, chunked_linear_cross_entropy_sum


def test_ce_chunk_pass_is_the_closed_form():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 13, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 13, (5,), generator=gen)
    row_weight = torch.rand(5, generator=gen, dtype=torch.float64)
    losses, d = chunk_loss_and_grad(logits, targets, row_weight)
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(losses, ref, rtol=1e-12, atol=1e-12)
    expected = (torch.softmax(logits, -1) - torch.nn.functional.one_hot(targets, 13)) \
        * row_weight[:, None]
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12)


def test_compile_loss_is_the_function_itself_with_compile_off():
    assert compile_loss(semigroup_loss, SpeedOptions()) is semigroup_loss
    assert compile_loss(semigroup_loss, SpeedOptions(fused=True)) is semigroup_loss


def _tiny(vocab: int, double_temb: bool, seed: int, device: str = "cpu") -> DiT:
    """head size 16 and length 16: the smallest FlexAttention takes (speed.attention)"""
    torch.manual_seed(seed)
    net = DiT(vocab_size=vocab, length=16, hidden_size=32, n_blocks=1, n_heads=2, cond_dim=8,
              dropout=0.0, double_temb=double_temb).to(device)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


def test_cuda_compile_options_are_options_this_torch_knows(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compile_options() is None
    assert compile_options({"max_autotune": False}) == {"max_autotune": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flex_blocks, "_capability", [(1, 0)])  # a GPU nothing was measured on
    options = compile_options()
    extra = compile_options({"max_autotune_gemm_backends": "ATEN,TRITON"})
    monkeypatch.undo()  # compile for this CPU machine, with the options a CUDA one gets
    assert options["max_autotune"] is True and options["max_autotune_gemm_backends"] == "ATEN"
    assert extra == {**options, "max_autotune_gemm_backends": "ATEN,TRITON"}
    assert_torch_accepts(options)


def test_compile_options_autotune_only_where_no_block_sizes_are_measured(monkeypatch):
    """A GPU with measured FlexAttention block sizes compiles without autotuning and its
    attention gets them; a GPU without, or another head size / dtype, gets none."""
    options = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 32, "bwd_BLOCK_M1": 32}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flex_blocks, "MEASURED", {((8, 6), 64, torch.bfloat16): options})
    for here, autotunes in [((8, 6), False), ((9, 0), True)]:
        monkeypatch.setattr(flex_blocks, "_capability", [here])
        assert compile_options()["max_autotune"] is autotunes
        assert compile_options()["max_autotune_pointwise"] is True  # launch configs still tuned
        assert flex_blocks.kernel_options(64, torch.bfloat16) == (None if autotunes else options)
        assert flex_blocks.kernel_options(32, torch.bfloat16) is None
        assert flex_blocks.kernel_options(64, torch.float32) is None
    monkeypatch.setattr(flex_blocks, "_capability", [None])  # no CUDA device
    assert not flex_blocks.measured_here()


def test_compile_options_log_where_the_block_sizes_come_from(monkeypatch, caplog):
    """The first compile options of a process log this GPU's source of FlexAttention block
    sizes (the attention seam itself runs inside compiled traces, where it cannot log)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flex_blocks, "MEASURED", {((8, 6), 64, torch.bfloat16): {}})
    for here, expected in [((8, 6), "measured for compute capability (8, 6) (head size 64"),
                           ((9, 0), "autotuned by inductor")]:
        monkeypatch.setattr(flex_blocks, "_capability", [here])
        speed_compile._log_block_source.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="speed.compile"):
            compile_options()
            compile_options()
        lines = [r.getMessage() for r in caplog.records if "block sizes" in r.getMessage()]
        assert len(lines) == 1 and expected in lines[0], lines


def assert_torch_accepts(options: dict) -> None:
    """torch.compile refuses unknown option names: a tiny function compiles and runs with them."""
    fn = torch.compile(lambda x: (x @ x.T).relu().sum(), dynamic=False, options=options)
    x = torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(fn(x), (x @ x.T).relu().sum())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [50_304, 4_100, 13])
def test_triton_ce_rows_kernel_matches_float64_gpu(dtype, vocab):
    """speed/ce_triton.py's one-read kernel: losses and dlogits (written over the logits)
    against float64 on the same rounded logits; vocabularies over, across and under its
    column block."""
    from speed import ce_triton

    gen = torch.Generator(device="cuda").manual_seed(vocab)
    n = 300
    logits = (torch.randn(n, vocab, device="cuda", generator=gen) * 4).to(dtype)
    logits[:, -3:] = -30_000.0  # pads of the padded vocabulary
    targets = torch.randint(0, vocab - 3, (n,), device="cuda", generator=gen)
    row_weight = torch.rand(n, device="cuda", generator=gen)
    x = logits.double()
    loss_ref = torch.logsumexp(x, -1) - x.gather(1, targets[:, None]).squeeze(1)
    d_ref = (torch.softmax(x, -1) - torch.nn.functional.one_hot(targets, vocab)) \
        * row_weight.double()[:, None]
    losses, d = ce_triton.losses_and_grad_inplace(logits, targets, row_weight)
    assert d.data_ptr() == logits.data_ptr() and d.dtype == dtype
    torch.testing.assert_close(losses.double(), loss_ref, rtol=1e-5, atol=1e-5)
    # rtol: one rounding to the dtype; atol: the target entry p - 1 cancels, leaving p's
    # float32 error (a few 2^-24 of 1, times w <= 1) on a small number (one failure at 1e-7)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-20
    torch.testing.assert_close(d.double(), d_ref, rtol=ulp, atol=2.0**-19)


@pytest.mark.cuda
def test_mean_ce_triton_and_plain_chunk_passes_agree_gpu():
    """mean_linear_cross_entropy under bf16 autocast through the Triton chunk pass (fused) and the
    plain one: the same loss and gradients to bf16 rounding."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, hidden_dim, vocab = 2048, 64, 4_224
    hidden = torch.randn(2, n // 2, hidden_dim, device="cuda", generator=gen)
    weight = torch.randn(vocab, hidden_dim, device="cuda", generator=gen) * 0.2
    bias = torch.randn(vocab, device="cuda", generator=gen)
    tokens = torch.randint(0, vocab, (2, n // 2), device="cuda", generator=gen)
    mask = (torch.rand(2, n // 2, device="cuda", generator=gen) > 0.2).double()
    results = {}
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = chunked_linear_cross_entropy_sum(*leaves, tokens, mask / mask.sum(), fused,
                                                    chunk_tokens=700)
        results[fused] = (loss, *torch.autograd.grad(loss, leaves))
    for a, b in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("stage", [1, 2])
def test_distillation_losses_compiled_whole_give_the_eager_values_gpu(stage):
    """speed.compile.compile_loss on CUDA: each distillation loss compiled whole (its networks
    traced with it) gives the eager loss and student gradients, in float32."""
    vocab = 300  # unaligned: the DiT pads it inside
    teacher = _tiny(vocab, double_temb=False, seed=0, device="cuda").eval()
    networks = [teacher] + [_tiny(vocab, double_temb=True, seed=s, device="cuda")
                            for s in range(1, stage + 1)]
    for n in networks[:-1]:
        n.requires_grad_(False)
    student = networks[-1]
    loss = semigroup_loss if stage == 1 else flow_map_matching_loss
    gen = torch.Generator(device="cuda").manual_seed(2)
    tokens = torch.randint(0, vocab, (2, 16), device="cuda", generator=gen)
    s = torch.rand(2, device="cuda", generator=gen, dtype=torch.float64) * 0.5
    interval = Interval.from_endpoints(AlphaGammaTable(vocab), s, s + 0.4)
    noise = joint_gaussian_projection([n.input_embedding for n in networks], (2, 16), gen)
    eager = loss(*networks, tokens, interval, noise).sum()
    (eager_grad,) = torch.autograd.grad(eager, student.output_layer.linear.weight)
    torch._dynamo.reset()
    compiled = compile_loss(loss, SpeedOptions(fused=True, compile=True))(
        *networks, tokens, interval, noise).sum()
    (grad,) = torch.autograd.grad(compiled, student.output_layer.linear.weight)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-3, atol=1e-6)
    assert eager_grad.abs().sum() > 0
