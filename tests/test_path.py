"""D-space input path vs the materialised reference path (docs/math.md §3)."""

import pytest
import torch

from flow.losses import masked_token_mean
from flow.path import (
    gaussian_projection,
    input_noise,
    joint_gaussian_projection,
    joint_qr,
    noisy_input,
    project_draw,
    standard_draw,
    stratified_times,
)
from models.dit import DiT
from tests.oracles import denoiser_cross_entropy


def tiny_dit(vocab=16, hidden=8, length=4):
    torch.manual_seed(0)
    model = DiT(vocab, length, hidden, n_blocks=1, n_heads=2, cond_dim=8, dropout=0.0)
    with torch.no_grad():
        model.input_embedding.normal_(0, 0.3)
        for p in model.output_layer.parameters():
            p.normal_(0, 0.2)  # non-trivial logits
    return model.double()


def noise_of(model, tokens, path, gen):
    return input_noise(tokens, *model.input_embedding.shape, path, gen)


def test_gaussian_projection_covariance_matches_closed_form():
    gen = torch.Generator().manual_seed(1)
    e = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    n = 60_000
    draws = gaussian_projection(e, (n,), gen, dtype=torch.float64)
    ref = torch.randn(n, 16, generator=gen, dtype=torch.float64) @ e  # eps @ E
    cov_true = e.T @ e
    scale = cov_true.diagonal().max()
    for sample in (draws, ref):
        assert sample.mean(0).abs().max() < 5 * (scale / n).sqrt()
        # each entry of an empirical covariance has sd <= sqrt(2/n) * max variance
        assert (torch.cov(sample.T) - cov_true).abs().max() < 6 * (2 / n) ** 0.5 * scale


@pytest.mark.parametrize("shape", [(16, 6), (4, 6)])  # V > D (Cholesky), V <= D (eps @ E)
def test_drawn_apart_the_projection_is_the_same_draw(shape):
    """standard_draw then project_draw (the draw outside a compiled network) is, seed for seed,
    the one-call gaussian_projection; a draw of the other width is refused."""
    e = torch.randn(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    one = gaussian_projection(e, (3, 5), torch.Generator().manual_seed(9), dtype=torch.float64)
    draw = standard_draw((3, 5), *shape, torch.Generator().manual_seed(9), "cpu", torch.float64)
    assert draw.shape == (3, 5, min(shape))
    torch.testing.assert_close(project_draw(e, draw), one, rtol=0, atol=0)
    with pytest.raises(ValueError, match="width"):
        project_draw(e, torch.zeros(3, 5, max(shape)))


@pytest.mark.parametrize("case", ["distinct", "teacher_equals_student", "three_with_a_copy"])
def test_joint_projection_law_in_float32_is_the_closed_form_gram(case):
    """eps @ [E_1 | ...] in the training precision (float32, one QR, no float64): mean 0 and
    covariance AᵀA entrywise within 5 standard errors (sd of an entry of the empirical
    covariance of n Gaussian rows: sqrt((G_ii·G_jj + G_ij²) / n)), also for the singular
    Gram of equal embeddings (at initialisation); equal embeddings give equal draws."""
    gen = torch.Generator().manual_seed(7)
    vocab, dim, n = 50, 4, 200_000
    e1 = torch.randn(vocab, dim, generator=gen)
    e2 = e1.clone() if case != "distinct" else e1 + 0.5 * torch.randn(vocab, dim, generator=gen)
    blocks = [e1, e2]
    if case == "three_with_a_copy":
        blocks = [e1, torch.randn(vocab, dim, generator=gen), e1.clone()]
    a = torch.cat(blocks, 1).double()
    gram = a.T @ a
    blocks[-1].requires_grad_(True)  # a trained student after frozen teachers (block QR)
    y = joint_gaussian_projection(blocks, (n // 8, 8), gen).reshape(n, -1).detach()
    assert y.dtype == torch.float32 and y.shape == (n, a.shape[1])
    y = y.double()
    var = gram.diagonal()
    assert (y.mean(0).abs() < 5 * (var / n).sqrt()).all()
    se = ((var[:, None] * var[None, :] + gram.square()) / n).sqrt()
    cov = y.T @ y / n  # the mean is known to be 0
    assert ((cov - gram).abs() < 5 * se).all(), ((cov - gram).abs() / se).max()
    if case != "distinct":  # one eps seen twice through the same E: identical up to round-off
        last = y[:, -dim:]
        torch.testing.assert_close(y[:, :dim], last, rtol=0, atol=1e-4 * var.max().sqrt().item())


@pytest.mark.parametrize("frozen", [0, 1, 2, 3])
@pytest.mark.parametrize("duplicated", [False, True])
def test_joint_qr_factors_the_joint_embedding(frozen, duplicated):
    """QR = A, QᵀQ = I and RᵀR = AᵀA in float64, whether the frozen leading embeddings are
    factored apart (block Gram-Schmidt, cached) or not, also for E_S = E_T (rank deficient);
    the cache is refreshed when a frozen embedding is written."""
    gen = torch.Generator().manual_seed(3)
    vocab, dim = 30, 4
    blocks = [torch.randn(vocab, dim, generator=gen, dtype=torch.float64) for _ in range(3)]
    if duplicated:
        blocks[2] = blocks[0].clone()
    for i, e in enumerate(blocks):
        e.requires_grad_(i >= frozen)
    for _ in range(2):
        a = torch.cat(blocks, 1).detach()
        q, r = joint_qr(blocks, torch.float64)
        eye = torch.eye(q.shape[1], dtype=torch.float64)
        torch.testing.assert_close(q.T @ q, eye, rtol=0, atol=1e-12)
        torch.testing.assert_close(q @ r, a, rtol=0, atol=1e-12)
        torch.testing.assert_close(r.T @ r, a.T @ a, rtol=0, atol=1e-11)
        with torch.no_grad():
            blocks[0].mul_(2.0)  # a write: a cached factor must not be reused


def test_paths_same_mean_and_covariance_and_identical_without_noise():
    model = tiny_dit()
    tokens = torch.tensor([[3, 7, 0, 15]])
    n = 20_000
    batch = tokens.expand(n, -1)
    gamma = torch.full((n,), 0.4, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    outs = {}
    for path in ("dspace", "reference"):
        with torch.no_grad():
            outs[path] = noisy_input(model, batch, gamma, path, noise_of(model, batch, path, gen)).double()
    e = model.input_embedding.detach()
    mean_true = 0.4 * e[tokens[0]]
    cov_true = 0.6 ** 2 * e.T @ e
    scale = cov_true.diagonal().max()
    for path, h in outs.items():
        assert (h.mean(0) - mean_true).abs().max() < 5 * (scale / n).sqrt(), path
        for pos in range(4):
            cov = torch.cov(h[:, pos].T)
            assert (cov - cov_true).abs().max() < 6 * (2 / n) ** 0.5 * scale, (path, pos)
    one = torch.ones(1, dtype=torch.float64)
    with torch.no_grad():
        clean = [noisy_input(model, tokens, one, p, noise_of(model, tokens, p, gen)).double()
                 for p in ("dspace", "reference")]
    torch.testing.assert_close(clean[0], clean[1])
    torch.testing.assert_close(clean[0][0], e[tokens[0]])


def test_losses_agree_in_expectation_on_a_fixed_model():
    model = tiny_dit()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 16, (256, 4), generator=gen)
    mask = torch.ones_like(tokens)
    t = torch.rand(256, generator=gen, dtype=torch.float64)
    gamma = 0.2 + 0.6 * t
    per_path = {}
    for path in ("dspace", "reference"):
        vals = []
        for _ in range(40):
            with torch.no_grad():
                h = noisy_input(model, tokens, gamma, path, noise_of(model, tokens, path, gen)).double()
                vals.append(float(masked_token_mean(
                    denoiser_cross_entropy(model(h, t), tokens), mask)))
        per_path[path] = torch.tensor(vals)
    a, b = per_path["dspace"], per_path["reference"]
    se = ((a.var() + b.var()) / len(a)).sqrt()
    assert (a.mean() - b.mean()).abs() < 4 * se + 1e-4, (a.mean(), b.mean(), se)
    assert a.std() > 0  # the draws really are random


def test_stratified_times_cover_the_global_batch():
    offset = torch.tensor([0.37], dtype=torch.float64)
    parts = [stratified_times(8, slot, 4, offset) for slot in range(4)]
    everything = torch.sort(torch.cat(parts)).values.double()
    # one draw in each of the 32 strata of width 1/32
    strata = torch.floor(everything * 32)
    assert torch.equal(strata, torch.arange(32, dtype=torch.float64))
    single = stratified_times(32, 0, 1, offset)
    torch.testing.assert_close(torch.cat(parts), single)
