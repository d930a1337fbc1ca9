"""Masked (absorbing-state) diffusion as in MDLM: the math of the ``algo=mdlm`` baseline.

Conventions (MDLM, continuous time, SUBS parameterisation):

* the mask token is an extra vocabulary entry ``mask_index`` (the backbone has V + 1 input
  embeddings and V + 1 outputs; the mask output is never predicted);
* log-linear schedule: alpha(t) = 1 - (1 - eps)·t, so a token is masked at time t with
  probability ``1 - alpha(t) = (1 - eps)·t`` (MDLM's ``LogLinearNoise``: sigma(t) =
  -log(1 - (1 - eps)·t), move chance 1 - exp(-sigma));
* SUBS: zero probability on the mask token, and unmasked tokens are carried over, so only
  masked positions contribute to the loss;
* continuous-time NELBO per token: ``-alpha'(t) / (1 - alpha(t)) · [x_t = m] · (-log p(x_0 | x_t))``
  (for the log-linear schedule the weight is exactly 1 / t);
* ancestral sampler from t = 1 down a uniform grid: a masked position at t unmasks by s < t
  with probability (alpha(s) - alpha(t)) / (1 - alpha(t)), then takes a token drawn from the
  denoiser; unmasked positions never change.

Where this differs from the MDLM code, on purpose:

* the mask is always an extra entry V, also for BERT's vocabulary (LM1B), where MDLM reuses
  the tokenizer's own [MASK] id; this only adds one embedding row and one output;
* the sampler uses the exact mask probability (1 - eps)·t at every grid time (MDLM's cached
  ddpm update uses t itself, a 1e-3 relative difference);
* steps after the last mask is gone are skipped, and noise removal calls the network once more
  only when masks remain (sample_eval's NFE column counts ``steps``: an upper bound minus the
  possible extra call).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

DEFAULT_NOISE_EPS = 1e-3  # MDLM's LogLinearNoise eps: at t = 1 a token stays clean w.p. eps


def mask_probability(t: torch.Tensor, eps: float = DEFAULT_NOISE_EPS) -> torch.Tensor:
    """1 - alpha(t) = (1 - eps)·t: the chance a token is masked at time t; same shape as t."""
    return (1.0 - eps) * t


def loss_weight(t: torch.Tensor, eps: float = DEFAULT_NOISE_EPS) -> torch.Tensor:
    """-alpha'(t) / (1 - alpha(t)) = (1 - eps) / ((1 - eps)·t) = 1 / t; same shape as t."""
    return (1.0 - eps) / mask_probability(t, eps)


def mask_tokens(tokens: torch.Tensor, t: torch.Tensor, mask_index: int,
                eps: float = DEFAULT_NOISE_EPS,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t: each token of (B, L) replaced by ``mask_index`` independently with probability
    ``mask_probability(t)`` (t: (B,), one time per sequence) -> (B, L)."""
    u = torch.rand(tokens.shape, generator=generator, device=tokens.device, dtype=torch.float64)
    masked = u < mask_probability(t.double(), eps)[:, None]
    return torch.where(masked, torch.full_like(tokens, mask_index), tokens)


def subs_log_probs(logits: torch.Tensor, xt: torch.Tensor, mask_index: int) -> torch.Tensor:
    """The SUBS denoiser log p_theta(x_0 | x_t): (B, L, V + 1) float32.

    The mask logit is set to -inf (zero masking probability) before the softmax; at unmasked
    positions the distribution is a point mass on x_t (carry-over unmasking). Reference form,
    materialising (B, L, V + 1); the loss uses ``masked_diffusion_loss`` instead.
    """
    logits = logits.float().clone()
    logits[..., mask_index] = float("-inf")
    log_p = logits.log_softmax(dim=-1)
    carry = F.one_hot(xt, logits.shape[-1]).bool()
    point = torch.where(carry, 0.0, float("-inf"))
    return torch.where((xt != mask_index)[..., None], point, log_p)


def masked_diffusion_loss(logits: torch.Tensor, tokens: torch.Tensor, xt: torch.Tensor,
                          t: torch.Tensor, mask_index: int,
                          eps: float = DEFAULT_NOISE_EPS) -> torch.Tensor:
    """MDLM's continuous-time NELBO per token (B, L), float32.

    logits: (B, L, V + 1) with ``mask_index == V`` (the last entry); tokens, xt: (B, L);
    t: (B,). Equals ``-loss_weight(t) · subs_log_probs(logits, xt)[x_0]``: unmasked positions
    contribute 0 (carry-over), masked ones the cross-entropy over the V real tokens (dropping
    the mask column = giving it logit -inf).
    """
    if mask_index != logits.shape[-1] - 1:
        raise ValueError(f"mask_index={mask_index} must be the last output entry "
                         f"({logits.shape[-1] - 1})")
    real = logits[..., :mask_index]
    ce = F.cross_entropy(real.flatten(0, 1).float(), tokens.flatten(),
                         reduction="none").view_as(tokens)
    weight = loss_weight(t.float(), eps)[:, None]
    return torch.where(xt == mask_index, weight * ce, torch.zeros_like(ce))


def time_grid(steps: int, t_final: float, device: torch.device) -> torch.Tensor:
    """(steps + 1,) float64 times from 1 down to ``t_final`` (MDLM: linspace(1, 1e-5))."""
    if steps < 1:
        raise ValueError(f"sampling.steps entries must be >= 1, got {steps}")
    if not 0.0 <= t_final < 1.0:
        raise ValueError(f"the final sampling time must lie in [0, 1), got {t_final}")
    return torch.linspace(1.0, t_final, steps + 1, device=device, dtype=torch.float64)


def ancestral_step(xt: torch.Tensor, probs: torch.Tensor, t: float, s: float, mask_index: int,
                   eps: float = DEFAULT_NOISE_EPS,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One reverse step t -> s < t of the ancestral sampler: (B, L) -> (B, L).

    probs: (B, L, V) the denoiser's p(x_0 | x_t) over the real tokens (rows summing to 1).
    A masked position unmasks with probability (m_t - m_s) / m_t (m = ``mask_probability``)
    into a token drawn from ``probs``, i.e. q(x_s | x_t, x_0 ~ p) of MDLM; unmasked positions
    are carried over.
    """
    m_t = float(mask_probability(torch.tensor(t, dtype=torch.float64), eps))
    m_s = float(mask_probability(torch.tensor(s, dtype=torch.float64), eps))
    unmask_prob = (m_t - m_s) / m_t
    u = torch.rand(xt.shape, generator=generator, device=xt.device, dtype=torch.float64)
    draw = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1,
                             generator=generator).view_as(xt)
    unmask = (xt == mask_index) & (u < unmask_prob)
    return torch.where(unmask, draw, xt)


DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t (B,)) -> (B, L, V)


@torch.no_grad()
def sample_ancestral(denoise: DenoiseFn, batch: int, length: int, mask_index: int, steps: int,
                     t_final: float, noise_removal: bool, eps: float = DEFAULT_NOISE_EPS,
                     generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """MDLM ancestral sampling: all-mask (B, L) at t = 1, ``steps`` steps down to ``t_final``,
    then (``noise_removal``) every position still masked takes the denoiser's argmax at
    ``t_final``. ``denoise(x_t, t)`` gives p(x_0 | x_t) (B, L, V). Returns tokens (B, L);
    without noise removal, positions still masked hold ``mask_index``.
    """
    x = torch.full((batch, length), mask_index, dtype=torch.long, device=device)
    grid = time_grid(steps, t_final, torch.device(device))
    for i in range(steps):
        if not bool((x == mask_index).any()):
            break  # nothing left to unmask: the remaining steps are identities
        t = grid[i].expand(batch).float()
        x = ancestral_step(x, denoise(x, t), float(grid[i]), float(grid[i + 1]), mask_index,
                           eps, generator)
    if noise_removal and bool((x == mask_index).any()):
        t = grid[-1].expand(batch).float()
        x = torch.where(x == mask_index, denoise(x, t).argmax(dim=-1), x)
    return x
