"""The losses' fused kernels (flow/fused.py) compile and give the eager results; the compile
options of CUDA machines are options this torch knows."""

import pytest
import torch

from flow import fused
from flow.flow_map import (
    matching_target,
    probabilities,
    scaled_residual_square_sum,
    semigroup_target,
    softmax_residual_square_sum,
)
from flow.losses import chunk_loss_and_grad
from flow.sampling import flow_map_tokens, probabilities_and_tokens
from models import parallelize


@pytest.fixture
def compiled_on_cpu(monkeypatch):
    """fused_kernel compiles CPU inputs too (on CUDA only, by default)."""
    monkeypatch.setitem(fused._FUSED_KERNELS, "devices", ("cpu", "cuda"))
    monkeypatch.setitem(fused._FUSED_KERNELS, "enabled", True)
    monkeypatch.setattr(fused, "_compiled_kernels", {})
    yield
    assert fused._compiled_kernels, "nothing was compiled"


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    batch, length, vocab = 2, 3, 11
    logits = [torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64) * 3 for _ in range(4)]
    weights = torch.rand(batch, 4, generator=gen, dtype=torch.float64)
    scale = torch.rand(batch, generator=gen, dtype=torch.float64)
    return logits, weights, scale


def test_fused_distillation_kernels_compile_to_the_eager_results(compiled_on_cpu):
    logits, weights, scale = _inputs(0)
    target = semigroup_target(*logits, weights)
    torch.testing.assert_close(target, semigroup_target.eager(*logits, weights),
                               rtol=1e-12, atol=1e-12)
    # closed form of the target, written out: (w0 - 1)·p_s + w1·p_u + w2·g_su + w3·g_ut
    w = weights[:, None, None, :]
    p_s, p_u = (torch.softmax(x, -1) for x in (logits[0], logits[2]))
    direct = (w[..., 0] - 1) * p_s + w[..., 1] * p_u + w[..., 2] * logits[1] + w[..., 3] * logits[3]
    torch.testing.assert_close(target, direct, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probabilities(logits[0], torch.float32), p_s.float())
    torch.testing.assert_close(matching_target(logits[0], logits[1], scale, scale ** 2),
                               matching_target.eager(logits[0], logits[1], scale, scale ** 2),
                               rtol=1e-12, atol=1e-12)
    # the differentiable ones: values and gradients against autograd of the eager function
    for kernel in (scaled_residual_square_sum, softmax_residual_square_sum):
        g = logits[3].clone().requires_grad_(True)
        out = kernel(target, g, scale)
        (grad,) = torch.autograd.grad(out.sum(), g)
        g_eager = logits[3].clone().requires_grad_(True)
        out_eager = kernel.eager(target, g_eager, scale)
        (grad_eager,) = torch.autograd.grad(out_eager.sum(), g_eager)
        torch.testing.assert_close(out, out_eager, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, grad_eager, rtol=1e-10, atol=1e-12)
        assert grad.abs().sum() > 0


def test_fused_ce_chunk_kernel_compiles_to_the_eager_results(compiled_on_cpu):
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


def test_sampler_softmax_and_argmax_kernel_compiles_to_a_float64_reference(compiled_on_cpu):
    gen = torch.Generator().manual_seed(3)
    vocab, padded = 11, 16
    logits = torch.randn(2, 5, padded, generator=gen) * 4
    logits[..., vocab:] = -30_000.0  # the pads of the padded vocabulary (models/dit.py)
    logits[0, 0, vocab - 1] = logits[0, 0].max() + 1  # a winner at the last real entry
    p, tokens = probabilities_and_tokens(logits.to(torch.bfloat16), vocab)
    reference = torch.softmax(logits.to(torch.bfloat16).double(), -1)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.double(), reference, rtol=1e-6, atol=1e-7)
    assert torch.equal(tokens, logits.to(torch.bfloat16)[..., :vocab].double().argmax(-1))
    assert tokens[0, 0] == vocab - 1 and float(p[..., vocab:].max()) == 0.0


def test_flow_map_last_step_tokens_kernel_compiles_to_a_float64_reference(compiled_on_cpu):
    gen = torch.Generator().manual_seed(4)
    vocab, padded = 11, 16
    teacher, student = (torch.randn(3, 7, padded, generator=gen) * 3 for _ in range(2))
    teacher[..., vocab:], student[..., vocab:] = -30_000.0, 0.0  # pads: p = 0, g = 0
    teacher, student = teacher.to(torch.bfloat16), student.to(torch.bfloat16)
    coefficient = 0.37
    tokens = flow_map_tokens(teacher, student, torch.tensor(coefficient, dtype=torch.float64),
                             vocab)
    value = torch.softmax(teacher.double(), -1) + coefficient * student.double()
    assert torch.equal(tokens, value[..., :vocab].argmax(-1))
    # the student's term decides some tokens: without it the argmax differs somewhere
    assert not torch.equal(tokens, torch.softmax(teacher.double(), -1)[..., :vocab].argmax(-1))


def test_fused_kernels_stay_eager_when_compilation_is_off(monkeypatch):
    monkeypatch.setitem(fused._FUSED_KERNELS, "devices", ("cpu", "cuda"))
    monkeypatch.setattr(fused, "_compiled_kernels", {})
    fused.use_fused_kernels(False)
    try:
        logits, weights, _ = _inputs(2)
        semigroup_target(*logits, weights)
        assert not fused._compiled_kernels
    finally:
        fused.use_fused_kernels(True)


def test_cuda_compile_options_are_options_this_torch_knows(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parallelize.compile_options() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    options = parallelize.compile_options()
    monkeypatch.undo()  # compile for this CPU machine, with the options a CUDA one gets
    assert options["max_autotune"] is True and options["max_autotune_gemm_backends"] == "ATEN"
    assert_torch_accepts(options)


def assert_torch_accepts(options: dict) -> None:
    """torch.compile refuses unknown option names: a tiny function compiles and runs with them."""
    fn = torch.compile(lambda x: (x @ x.T).relu().sum(), dynamic=False, options=options)
    x = torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(fn(x), (x @ x.T).relu().sum())


def test_compile_tuning_reaches_the_cuda_compile_options(monkeypatch, caplog):
    """training.compile_tuning -> algo -> models.parallelize: the CUDA options gain inductor's
    coordinate_descent_tuning (which this torch accepts), and only while it is on; a CPU
    machine is told that it does not apply."""
    import logging

    import algo
    from runtime.config import resolve_config
    from tests.helpers import compose_config

    monkeypatch.setattr(parallelize, "_TUNING", {"coordinate_descent": False})
    config = resolve_config(compose_config(["model=tiny", "model.length=8",
                                            "training.compile=true",
                                            "training.compile_tuning=true"]))
    with caplog.at_level(logging.WARNING, logger="models.parallelize"):
        algo.FLM(config, vocab_size=16)
    assert "compile_tuning" in caplog.text  # this CPU machine: it does not apply
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tuned = parallelize.compile_options()
    parallelize.use_compile_tuning(False)
    plain = parallelize.compile_options()
    monkeypatch.undo()
    assert tuned == {**plain, "coordinate_descent_tuning": True}
    assert_torch_accepts(tuned)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="Triton kernel: needs CUDA (bench/gpu_round.sh cudatests)")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [50_304, 4_100, 13])
def test_triton_ce_rows_kernel_matches_float64_gpu(dtype, vocab):
    """flow/ce_triton.py's one-read kernel: losses and dlogits (written over the logits) against
    float64 on the same rounded logits; vocabularies over, across and under its column block."""
    from flow import ce_triton

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


@needs_cuda
def test_mean_ce_triton_and_compiled_chunk_kernels_agree_gpu(monkeypatch):
    """MeanLinearCrossEntropy under bf16 autocast through each chunk kernel (CE_KERNEL): the
    same loss and gradients to bf16 rounding."""
    from flow import losses as losses_module

    gen = torch.Generator(device="cuda").manual_seed(0)
    n, hidden_dim, vocab = 2048, 64, 4_224
    hidden = torch.randn(2, n // 2, hidden_dim, device="cuda", generator=gen)
    weight = torch.randn(vocab, hidden_dim, device="cuda", generator=gen) * 0.2
    bias = torch.randn(vocab, device="cuda", generator=gen)
    tokens = torch.randint(0, vocab, (2, n // 2), device="cuda", generator=gen)
    mask = (torch.rand(2, n // 2, device="cuda", generator=gen) > 0.2).long()
    results = {}
    for kernel in losses_module.CE_KERNELS:
        monkeypatch.setattr(losses_module, "CE_KERNEL", kernel)
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = losses_module.chunked_linear_cross_entropy_mean(*leaves, tokens, mask,
                                                                   chunk_tokens=700)
        results[kernel] = (loss, *torch.autograd.grad(loss, leaves))
    for a, b in zip(results["triton"], results["compiled"], strict=True):
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-5)
