"""The backbone's conventions against independent float64 computations (the paper's code)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from models.dit import DiT, apply_rotary, rotary_tables, sinusoidal_features
from speed import attention as attention_module
from speed import flex_blocks
from speed.attention import attention, math_attention, softcap_score_mod


def test_time_features_are_cos_then_sin_of_raw_t():
    t = torch.tensor([0.0, 0.37, 1.0])
    dim = 256
    expected = torch.empty(3, dim, dtype=torch.float64)
    for i, ti in enumerate(t.double().tolist()):
        for j in range(dim // 2):
            freq = 10_000.0 ** (-j / (dim // 2))
            expected[i, j] = math.cos(ti * freq)
            expected[i, dim // 2 + j] = math.sin(ti * freq)
    torch.testing.assert_close(sinusoidal_features(t, dim).double(), expected, rtol=0, atol=1e-6)


def test_two_time_embeddings_are_summed_before_the_silu():
    torch.manual_seed(0)
    net = DiT(vocab_size=10, length=4, hidden_size=16, n_blocks=1, n_heads=2, cond_dim=8,
              double_temb=True)
    for p in net.parameters():
        torch.nn.init.normal_(p)
    t, t2 = torch.rand(3), torch.rand(3)

    def mlp(layers, time):  # float64, from the weights
        w0, b0 = layers[0].weight.double(), layers[0].bias.double()
        w2, b2 = layers[2].weight.double(), layers[2].bias.double()
        j = torch.arange(128, dtype=torch.float64)
        args = time.double()[:, None] * torch.exp(-math.log(10_000) * j / 128)
        feats = torch.cat([args.cos(), args.sin()], dim=-1)
        return F.silu(feats @ w0.T + b0) @ w2.T + b2

    expected = F.silu(mlp(net.time_embedding.mlp, t) + mlp(net.second_time_embedding.mlp, t2))
    torch.testing.assert_close(net.conditioning(t, t2).double(), expected, rtol=1e-5, atol=1e-5)


def test_rotary_rotates_half_split_pairs_as_complex_numbers():
    torch.manual_seed(1)
    hd, length = 8, 5
    x = torch.randn(2, 3, length, hd, dtype=torch.float64)
    cos, sin = rotary_tables(length, hd, torch.device("cpu"))
    ours = apply_rotary(x, cos.double(), sin.double())
    expected = torch.empty_like(x)
    for pos in range(length):
        for j in range(hd // 2):
            angle = pos * 10_000.0 ** (-2 * j / hd)
            pair = torch.complex(x[..., pos, j], x[..., pos, j + hd // 2]) * complex(
                math.cos(angle), math.sin(angle))
            expected[..., pos, j], expected[..., pos, j + hd // 2] = pair.real, pair.imag
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap", [50.0, None])
def test_attention_softcap_and_causal_mask(causal, softcap):
    torch.manual_seed(2)
    b, h, length, hd = 2, 3, 6, 4
    q, k, v = (torch.randn(b, h, length, hd, dtype=torch.float64) * 6 for _ in range(3))
    expected = torch.empty_like(q)
    for i in range(length):  # query by query, from the definition
        keys = range(i + 1) if causal else range(length)
        scores = torch.stack([(q[:, :, i] * k[:, :, j]).sum(-1) / math.sqrt(hd) for j in keys], -1)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        weights = torch.softmax(scores, dim=-1)
        expected[:, :, i] = sum(weights[..., n, None] * v[:, :, j] for n, j in enumerate(keys))
    ours = attention(q, k, v, softcap, causal)
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-7)
    if softcap is not None:  # the logits reach the cap, so the cap changes the result
        assert (attention(q, k, v, None, causal) - ours).abs().max() > 1e-3


def test_input_embedding_init_is_kaiming_uniform():
    torch.manual_seed(3)
    dim = 64
    e = DiT(vocab_size=2000, length=4, hidden_size=dim, n_blocks=1, n_heads=2,
            cond_dim=8).input_embedding.detach().double()
    bound = 1 / math.sqrt(dim)  # kaiming_uniform_(a=sqrt(5)) on (V, D): fan_in = D
    assert e.abs().max() <= bound and e.abs().max() > 0.999 * bound
    n = e.numel()
    var, var_of_var = bound ** 2 / 3, bound ** 4 * (1 / 5 - 1 / 9)  # U(-b, b) moments
    assert abs(e.pow(2).mean() - var) < 5 * math.sqrt(var_of_var / n)
    assert abs(e.mean()) < 5 * math.sqrt(var / n)



def test_attention_backend_choice_traces_without_a_graph_break(monkeypatch):
    """The choice runs inside compiled networks: fullgraph fails on any graph break there
    (an import attempted inside the trace is one, at every block)."""
    dit = attention_module
    shortest = dit.FLEX_MIN_LENGTH
    for on_cuda, flash2, softcap, length, expected in [
            (True, None, 50.0, shortest, "flex"), (True, object(), 50.0, shortest, "flash-attn"),
            (False, None, 50.0, shortest, "math"), (True, None, None, shortest, "sdpa"),
            (True, None, 50.0, shortest - 1, "math")]:  # too short for FlexAttention
        q = torch.zeros(1, 1, length, 8, dtype=torch.bfloat16)
        monkeypatch.setattr(dit, "_on_cuda", lambda q, answer=on_cuda: answer)
        monkeypatch.setattr(dit, "_FLASH2", flash2)
        torch._dynamo.reset()
        compiled = torch.compile(lambda x, cap=softcap: (x + 1, dit.backend(x, cap)),
                                 fullgraph=True, backend="eager")
        assert compiled(q)[1] == expected


@pytest.mark.parametrize("length", [8, 16])
def test_attention_through_compiled_flex_is_right_at_short_lengths(monkeypatch, length):
    """The CUDA choice run on the CPU, FlexAttention compiled by inductor (forward: it has no CPU
    backward): the seam's output equals the float64 plain attention at a length below
    FLEX_MIN_LENGTH (where compiled FlexAttention itself was off by up to 0.9) and at it."""
    dit = attention_module
    monkeypatch.setattr(dit, "_on_cuda", lambda q: True)
    monkeypatch.setattr(dit, "_FLASH2", None)
    monkeypatch.setattr(dit, "_compiled_flex", [])
    g = torch.Generator().manual_seed(length)
    q, k, v = (3 * torch.randn(2, 2, length, 16, generator=g) for _ in range(3))
    ref = math_attention(q.double(), k.double(), v.double(), 50.0, False)
    torch._dynamo.reset()
    with torch.no_grad():
        out = attention(q, k, v, 50.0, False)
    assert (out.double() - ref).abs().max() < 1e-5


def test_flex_attention_gets_the_block_sizes_measured_for_the_gpu(monkeypatch):
    """The seam's FlexAttention call carries ``speed.flex_blocks``' kernel_options for its
    head size and dtype (the CUDA choice on the CPU, FlexAttention eager), and still computes
    the capped attention."""
    dit = attention_module
    measured = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4}
    monkeypatch.setattr(dit, "_on_cuda", lambda q: True)
    monkeypatch.setattr(dit, "_FLASH2", None)
    monkeypatch.setattr(flex_blocks, "_capability", [(9, 0)])
    monkeypatch.setattr(flex_blocks, "MEASURED", {((9, 0), 8, torch.float32): measured})
    seen = []

    def recording_flex(*args, **kwargs):
        seen.append(kwargs["kernel_options"])
        return flex_attention(*args, **{**kwargs, "kernel_options": None})

    monkeypatch.setattr(dit, "_flex_attention", lambda: recording_flex)
    g = torch.Generator().manual_seed(0)
    for head_size, expected in [(8, measured), (16, None)]:
        q, k, v = (3 * torch.randn(2, 3, 16, head_size, generator=g) for _ in range(3))
        with torch.no_grad():
            out = attention(q, k, v, 5.0, False)
        assert seen[-1] == expected
        ref = math_attention(q.double(), k.double(), v.double(), 5.0, False)
        assert (out.double() - ref).abs().max() < 1e-5


def test_flex_attention_is_traced_into_a_compiled_network_graph(monkeypatch):
    """Inside a compiled trace the soft-capped attention is FlexAttention itself, in the same
    graph (fullgraph fails on a break), and computes what the explicit form computes."""
    dit = attention_module
    monkeypatch.setattr(dit, "_on_cuda", lambda q: True)  # the CUDA choice, run on the CPU
    monkeypatch.setattr(dit, "_FLASH2", None)
    g = torch.Generator().manual_seed(0)
    q, k, v = (3 * torch.randn(2, 3, 16, 8, generator=g) for _ in range(3))
    ref = math_attention(q.double(), k.double(), v.double(), 5.0, False)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, 5.0, False) * 2,
                             fullgraph=True, backend="eager")
    with torch.no_grad():
        out = compiled(q, k, v) / 2
    assert (out.double() - ref).abs().max() < 1e-5
    assert (math_attention(q, k, v, None, False).double() - ref).abs().max() > 1e-3  # cap acts


def test_the_softcap_score_mod_is_the_capped_score():
    """The score_mod is softcap·tanh(s / softcap), written from the definition (float64 eager:
    the approximate instruction is only in generated CUDA kernels)."""
    s = torch.linspace(-400.0, 400.0, 2001, dtype=torch.float64)
    got = softcap_score_mod(50.0)(s, None, None, None, None)
    expected = 50.0 * (torch.exp(s / 25.0) - 1) / (torch.exp(s / 25.0) + 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert softcap_score_mod(50.0) is softcap_score_mod(50.0)  # compiled graphs guard on it


def test_approx_tanh_op_gradient_and_its_compiled_kernel_off_cuda():
    """The custom op's autograd formula (grad·(1 - y²) from its output) against numerical
    differences; compiled by inductor on the CPU (where its lowering is the exact tanh) its
    values and gradients are torch.tanh's."""
    from speed.approx_tanh import register_lowering, tanh_approx

    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tanh_approx, (x,))
    torch.library.opcheck(tanh_approx, (torch.randn(8),))
    register_lowering()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: 3 * tanh_approx(x), fullgraph=True)
    x = torch.randn(1000) * 3
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled(mine).sum().backward()
    (3 * torch.tanh(theirs)).sum().backward()
    torch.testing.assert_close(compiled(mine), 3 * torch.tanh(theirs))
    torch.testing.assert_close(mine.grad, theirs.grad)


def test_compiled_flex_attention_with_the_models_score_mod_matches_float64():
    """FlexAttention compiled on the CPU with the model's score_mod (the approx-tanh op through
    its inductor lowering) against the explicit float64 attention (forward: FlexAttention has no
    CPU backward; the GPU test covers it)."""
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (4 * torch.randn(2, 3, 32, 8, generator=g) for _ in range(3))
    ref = math_attention(q.double(), k.double(), v.double(), 5.0, False)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(flex_attention, dynamic=False)(q, k, v,
                                                           score_mod=softcap_score_mod(5.0))
    assert (out.double() - ref).abs().max() < 1e-5
    assert (math_attention(q, k, v, None, False).double() - ref).abs().max() > 1e-2  # cap acts
