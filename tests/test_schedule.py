"""alpha <-> gamma table against Monte Carlo and its own inverse (docs/math.md §2)."""

import math

import numpy as np
import pytest
import torch

from flow.schedule import AlphaGammaTable


def monte_carlo_alpha(gamma: float, vocab: int, n: int, seed: int) -> tuple[float, float]:
    """Estimate alpha(gamma) by drawing x_gamma and checking the argmax; returns (alpha, se)."""
    gen = torch.Generator().manual_seed(seed)
    hits = 0
    chunk = max(1, 2_000_000 // vocab)
    done = 0
    while done < n:
        m = min(chunk, n - done)
        eps = torch.randn(m, vocab, generator=gen, dtype=torch.float64)
        x = (1 - gamma) * eps
        x[:, 0] += gamma  # clean token 0; symmetric in the token index
        hits += int((x.argmax(dim=1) == 0).sum())
        done += m
    q = hits / n
    se = math.sqrt(max(q * (1 - q), 1.0 / n) / n)
    scale = vocab / (vocab - 1)
    return scale * (q - 1 / vocab), scale * se


@pytest.mark.parametrize("vocab,n", [(8, 40_000), (1000, 20_000), (50258, 3_000)])
def test_alpha_matches_monte_carlo(vocab, n):
    table = AlphaGammaTable(vocab)
    for k, gamma in enumerate([0.3, 0.6, 0.75, 0.8, 0.85]):
        mc, se = monte_carlo_alpha(gamma, vocab, n, seed=k)
        tab = float(table.alpha_of_gamma(torch.tensor([gamma], dtype=torch.float64)))
        assert abs(tab - mc) < 4 * se + 2e-3, (vocab, gamma, tab, mc, se)


@pytest.mark.parametrize("vocab", [2, 8, 1000, 50258])
def test_endpoints_monotone_and_round_trip(vocab):
    table = AlphaGammaTable(vocab)
    ends = table.gamma_of_alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ends.tolist() == [0.0, 1.0]
    alpha = torch.linspace(0, 1, 4001, dtype=torch.float64)
    gamma = table.gamma_of_alpha(alpha)
    assert torch.all(gamma[1:] >= gamma[:-1])
    # gamma(alpha(gamma)) = gamma where alpha is not saturated (strictly increasing there)
    g = torch.linspace(0.02, 0.98, 97, dtype=torch.float64)
    a = table.alpha_of_gamma(g)
    ok = (a > 1e-9) & (a < 1 - 1e-9)
    assert ok.sum() > 10
    np.testing.assert_allclose(table.gamma_of_alpha(a)[ok], g[ok], atol=2e-4)


def test_evaluates_on_input_device_and_dtype():
    table = AlphaGammaTable(100)
    t = torch.rand(16, dtype=torch.float32)
    out = table.gamma_of_alpha(t)
    assert out.dtype == torch.float32 and out.shape == t.shape
    assert torch.all((out >= 0) & (out <= 1))
