"""The alpha <-> gamma time table (docs/math.md §2).

The model's time ``t`` is the discrete signal level ``alpha``: the probability,
rescaled to [0, 1], that the argmax of ``x_gamma = (1 - gamma)·eps + gamma·e(x)``
recovers the clean token. The map depends on the vocabulary size ``V`` only, so
it is tabulated once per ``V`` on a uniform gamma grid (float64, on the host)
and then evaluated on the device, in batch, by linear interpolation.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

GRID_POINTS = 10_001  # uniform gamma grid, endpoints included
QUADRATURE_NODES = 100  # Gauss-Hermite nodes for the expectation over z ~ N(0, 1)


def argmax_recovery_probability(gamma: np.ndarray, vocab_size: int,
                                nodes: int = QUADRATURE_NODES) -> np.ndarray:
    """q(gamma) = E_z[Phi(z + gamma / (1 - gamma))^(V - 1)], float64.

    Derivation: ``argmax x_gamma = x`` iff every other coordinate's noise
    ``eps_i`` stays below ``eps_x + gamma / (1 - gamma)``; condition on
    ``z = eps_x``. ``(V - 1)·log Phi`` uses a log-CDF so that it stays finite
    for V ~ 5e4.
    """
    gamma = np.asarray(gamma, dtype=np.float64)
    x, w = np.polynomial.hermite.hermgauss(nodes)  # weight exp(-x^2)
    z = np.sqrt(2.0) * x  # so that sum(w f(z)) / sqrt(pi) = E_{z~N(0,1)} f(z)
    with np.errstate(divide="ignore"):
        shift = np.where(gamma < 1.0, gamma / np.maximum(1.0 - gamma, 0.0), np.inf)
    log_cdf = torch.special.log_ndtr(torch.from_numpy(z[None, :] + shift[:, None])).numpy()
    log_terms = (vocab_size - 1) * log_cdf
    q = (np.exp(log_terms) * w[None, :]).sum(axis=1) / np.sqrt(np.pi)
    q = np.where(gamma >= 1.0, 1.0, q)
    return q


def alpha_of_gamma_exact(gamma: np.ndarray, vocab_size: int) -> np.ndarray:
    """alpha(gamma) = V/(V-1)·(q(gamma) - 1/V), by quadrature (no table)."""
    q = argmax_recovery_probability(gamma, vocab_size)
    return vocab_size / (vocab_size - 1) * (q - 1.0 / vocab_size)


@functools.lru_cache(maxsize=16)
def _tabulate(vocab_size: int, grid_points: int) -> tuple[np.ndarray, np.ndarray]:
    gamma = np.linspace(0.0, 1.0, grid_points)
    alpha = alpha_of_gamma_exact(gamma, vocab_size)
    # Pin the endpoints and force monotonicity against quadrature round-off, so
    # that inversion by interpolation is well defined.
    alpha[0], alpha[-1] = 0.0, 1.0
    alpha = np.clip(np.maximum.accumulate(alpha), 0.0, 1.0)
    return gamma, alpha


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x; xp non-decreasing."""
    x = x.clamp(0.0, 1.0)
    idx = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    width = x1 - x0
    frac = torch.where(width > 0, (x - x0) / torch.where(width > 0, width, 1.0), 0.5)
    out = f0 + frac * (f1 - f0)
    # Flat stretches of the table (alpha saturates to 1 in float64 before
    # gamma = 1 for small V) must not move the endpoints: t = 1 is clean data.
    out = torch.where(x >= xp[-1], fp[-1], out)
    return torch.where(x <= xp[0], fp[0], out)


class AlphaGammaTable(torch.nn.Module):
    """Dense monotone alpha(gamma) table for one vocabulary size.

    Buffers move with the module, so ``gamma_of_alpha`` runs on the device of
    its input with no host round trip. Buffers are not saved in checkpoints:
    the table is a function of ``vocab_size`` alone.
    """

    def __init__(self, vocab_size: int, grid_points: int = GRID_POINTS) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = vocab_size
        gamma, alpha = _tabulate(vocab_size, grid_points)
        self.register_buffer("gamma_grid", torch.from_numpy(gamma), persistent=False)
        self.register_buffer("alpha_grid", torch.from_numpy(alpha), persistent=False)

    def gamma_of_alpha(self, alpha: torch.Tensor) -> torch.Tensor:
        """gamma(t) = alpha^{-1}(t); same shape and dtype as the input."""
        out = _interp(alpha.to(self.alpha_grid.dtype), self.alpha_grid, self.gamma_grid)
        return out.to(alpha.dtype)

    def alpha_of_gamma(self, gamma: torch.Tensor) -> torch.Tensor:
        out = _interp(gamma.to(self.gamma_grid.dtype), self.gamma_grid, self.alpha_grid)
        return out.to(gamma.dtype)

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        return self.gamma_of_alpha(alpha)
