"""The fused output-layer cross-entropy (speed/cross_entropy.py) against the plain logits path."""

import pytest
import torch
import torch.nn.functional as F

import algo
from flow.losses import masked_token_mean, weighted_loss
from runtime.config import resolve_config
from speed import SpeedOptions
from speed.cross_entropy import (
    chunked_linear_cross_entropy,
    chunked_linear_cross_entropy_sum,
    linear_cross_entropy,
    mean_linear_cross_entropy,
    plain_linear_cross_entropy,
)
from tests.helpers import compose_config
from tests.oracles import denoiser_cross_entropy

VOCAB = 37


def chunked_linear_cross_entropy_mean(hidden, weight, bias, tokens, mask, chunk_tokens):
    """The masked mean through the weighted sum, with weights mask / Σ mask (as flow/losses)."""
    m = mask.double()
    return chunked_linear_cross_entropy_sum(hidden, weight, bias, tokens, m / m.sum(),
                                            fused=False, chunk_tokens=chunk_tokens)


def _problem(seed: int, batch: int = 3, length: int = 7, dim: int = 5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=gen, dtype=dtype).requires_grad_(True)
    weight = torch.randn(VOCAB, dim, generator=gen, dtype=dtype).requires_grad_(True)
    bias = torch.randn(VOCAB, generator=gen, dtype=dtype).requires_grad_(True)
    tokens = torch.randint(0, VOCAB, (batch, length), generator=gen)
    mask = (torch.rand(batch, length, generator=gen) > 0.3).long()
    log_weight = torch.randn(batch, generator=gen, dtype=dtype).requires_grad_(True)
    return hidden, weight, bias, tokens, mask, log_weight


@pytest.mark.parametrize("chunk", [1, 4, 64])  # one row, ragged chunks, one chunk
def test_chunked_ce_equals_plain_ce_values_and_gradients_float64(chunk):
    hidden, weight, bias, tokens, mask, log_weight = _problem(0)
    leaves = [hidden, weight, bias, log_weight]

    def total(per_token):
        return masked_token_mean(weighted_loss(per_token, log_weight), mask)

    plain_tok = denoiser_cross_entropy(hidden @ weight.T + bias, tokens)
    fused_tok = chunked_linear_cross_entropy(hidden, weight, bias, tokens, chunk_tokens=chunk)
    # independent closed form: logsumexp minus the target logit, per token
    logits = (hidden @ weight.T + bias).detach()
    direct = logits.logsumexp(-1) - logits.gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(fused_tok.detach(), direct, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_tok, plain_tok, rtol=1e-12, atol=1e-12)
    plain = torch.autograd.grad(total(plain_tok), leaves)
    fused = torch.autograd.grad(total(fused_tok), leaves)
    for a, b in zip(fused, plain):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 64])  # one row, ragged chunks, one chunk
@pytest.mark.parametrize("with_bias", [True, False])
def test_mean_ce_with_gradients_in_forward_equals_plain_float64(chunk, with_bias):
    """mean_linear_cross_entropy (gradients formed in the forward, then scaled by the upstream
    scalar) against autograd through the materialised logits: value and every gradient."""
    hidden, weight, bias, tokens, mask, _ = _problem(4)
    bias = bias if with_bias else None
    leaves = [x for x in (hidden, weight, bias) if x is not None]
    upstream = 2.5  # a non-unit upstream gradient reaches every leaf
    logits = F.linear(hidden, weight, bias)
    plain = masked_token_mean(denoiser_cross_entropy(logits, tokens), mask)
    fused = chunked_linear_cross_entropy_mean(hidden, weight, bias, tokens, mask,
                                              chunk_tokens=chunk)
    assert fused.dtype == torch.float64 and fused.dim() == 0
    # independent closed form of the value: mean over unmasked tokens of lse - target logit
    direct = logits.detach().logsumexp(-1) - logits.detach().gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(fused.detach(), direct[mask.bool()].mean(), rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(upstream * fused, leaves),
                    torch.autograd.grad(upstream * plain, leaves)):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_mean_ce_leaves_without_grad_get_none_and_masked_rows_nothing():
    hidden, weight, bias, tokens, mask, _ = _problem(5)
    weight.requires_grad_(False)
    mask = torch.zeros_like(mask)
    mask[0, 2] = 1  # one token counts: the loss and gradients are that token's alone
    fused = chunked_linear_cross_entropy_mean(hidden, weight, bias, tokens, mask, chunk_tokens=3)
    grad_h, grad_b = torch.autograd.grad(fused, (hidden, bias))
    logits = F.linear(hidden[0, 2], weight, bias)
    single = torch.logsumexp(logits, -1) - logits[tokens[0, 2]]
    torch.testing.assert_close(fused, single, rtol=1e-12, atol=0)
    assert grad_h[mask == 0].abs().max() == 0 and grad_h[0, 2].abs().sum() > 0
    torch.testing.assert_close(grad_b, torch.autograd.grad(single, bias)[0], rtol=1e-12, atol=0)


def test_mean_ce_under_bf16_autocast_matches_the_plain_path():
    hidden, weight, bias, tokens, mask, _ = _problem(6, dtype=torch.float32)
    leaves = [hidden, weight, bias]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = masked_token_mean(denoiser_cross_entropy(F.linear(hidden, weight, bias), tokens),
                                  mask)
        fused = chunked_linear_cross_entropy_mean(hidden, weight, bias, tokens, mask,
                                                  chunk_tokens=5)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-3)
    for a, b in zip(torch.autograd.grad(fused, leaves), torch.autograd.grad(plain, leaves)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_chunked_ce_without_bias_and_with_gradcheck():
    hidden, weight, _, tokens, _, _ = _problem(1, batch=2, length=3, dim=3)
    gen = torch.Generator().manual_seed(5)
    upstream = torch.rand(tokens.shape, generator=gen, dtype=torch.float64)

    def fn(h, w):
        return (chunked_linear_cross_entropy(h, w, None, tokens, chunk_tokens=2) * upstream).sum()

    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_chunked_ce_under_bf16_autocast_matches_the_plain_path():
    """The matmul runs in the autocast dtype as nn.Linear would; results agree to bf16 rounding."""
    hidden, weight, bias, tokens, mask, _ = _problem(2, dtype=torch.float32)
    leaves = [hidden, weight, bias]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_tok = denoiser_cross_entropy(F.linear(hidden, weight, bias), tokens)
        fused_tok = chunked_linear_cross_entropy(hidden, weight, bias, tokens, chunk_tokens=5)
    assert fused_tok.dtype == torch.float32
    torch.testing.assert_close(fused_tok, plain_tok, rtol=1e-3, atol=1e-3)
    plain = torch.autograd.grad(masked_token_mean(plain_tok, mask), leaves)
    fused = torch.autograd.grad(masked_token_mean(fused_tok, mask), leaves)
    for a, b in zip(fused, plain):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def _flm(**extra):
    overrides = ["model.length=8", "model.hidden_size=32", "model.n_heads=2",
                 "model.cond_dim=16", "model.n_blocks=1", "loader.global_batch_size=4",
                 "model.dropout=0.0"] + [f"{k}={v}" for k, v in extra.items()]
    config = resolve_config(compose_config(overrides))
    torch.manual_seed(0)
    return algo.FLM(config, vocab_size=VOCAB)


@pytest.mark.parametrize("weights", [False, True])
def test_the_seam_gives_the_plain_value_whatever_the_backend(weights):
    """linear_cross_entropy through chunked and none equals the float64 closed form."""
    hidden, weight, bias, tokens, mask, _ = _problem(7)
    w = (mask.double() / mask.sum()) if weights else None
    logits = (hidden @ weight.T + bias).detach()
    direct = logits.logsumexp(-1) - logits.gather(-1, tokens[..., None]).squeeze(-1)
    expected = (direct * w).sum() if weights else direct
    for fused_ce in ("chunked", "none"):
        got = linear_cross_entropy(hidden, weight, bias, tokens, w,
                                   SpeedOptions(fused_ce=fused_ce))
        torch.testing.assert_close(got.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(plain_linear_cross_entropy(hidden, weight, bias, tokens).detach(),
                               direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weighting", ["false", "true"])
def test_flm_loss_with_chunked_ce_equals_the_logits_path(weighting):
    extra = {"algo.learnable_loss_weighting": weighting}
    module = _flm(**extra, **{"training.fused_ce": "chunked"})
    with torch.no_grad():  # non-zero output layer and loss weighting (both start at zero)
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    plain_module = _flm(**extra, **{"training.fused_ce": "none"})
    plain_module.load_state_dict(module.state_dict())
    assert module.backbone.speed.fused_ce == "chunked"
    assert plain_module.backbone.speed.fused_ce == "none"
    gen = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(0, VOCAB, (4, 8), generator=gen),
             "attention_mask": (torch.rand(4, 8, generator=gen) > 0.25).long()}
    params = [p for p in module.parameters() if p.requires_grad]
    fused = module.compute_loss(batch, step=3, batch_idx=0)
    fused_grads = torch.autograd.grad(fused, params)
    plain = plain_module.compute_loss(batch, step=3, batch_idx=0)
    plain_grads = torch.autograd.grad(plain, [p for p in plain_module.parameters()
                                              if p.requires_grad])
    # float32 (the D-space input is built in float32): equal up to float32 round-off
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_ce_settings():
    """training.fused_ce: auto is the chunked CE on every device; anything else outside
    auto | chunked | none fails when the module is built, naming the key."""
    assert SpeedOptions.from_settings(False, "auto").fused_ce == "chunked"
    assert SpeedOptions.from_settings(True, "chunked") == SpeedOptions(True, True, "chunked")
    assert SpeedOptions.from_settings(False, "none") == SpeedOptions()
    for bad in ("bogus", "liger", "cce"):
        with pytest.raises(ValueError, match=f"training.fused_ce='{bad}'"):
            SpeedOptions.from_settings(False, bad)
    with pytest.raises(ValueError, match="training.fused_ce='liger'"):
        _flm(**{"training.fused_ce": "liger"})


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True),
                                   (False, False, True)])
def test_mean_ce_operator_registration_passes_torch_opcheck(needs):
    """flm::mean_linear_cross_entropy as torch.compile sees it: its schema, its fake (tracing)
    outputs against the real ones, and its autograd formula (torch.library.opcheck), for each
    set of gradients asked for."""
    hidden, weight, bias, tokens, mask, _ = _problem(7, dtype=torch.float32)
    weights = (mask / mask.sum()).float().flatten()
    need_h, need_w, need_b = needs
    args = (hidden.flatten(0, 1), weight, bias, tokens.flatten(), weights, 5, torch.float32,
            False, need_h, need_w, need_b)
    torch.library.opcheck(mean_linear_cross_entropy, args)
    total, grad_h, grad_w, grad_b = mean_linear_cross_entropy(*args)
    assert [g.numel() > 0 for g in (grad_h, grad_w, grad_b)] == list(needs)
