"""The FLM denoiser objective (docs/math.md §3).

``E_{t, x, eps}[-log softmax f(x_γ @ E, t)[x]]`` over the valid tokens of a batch: the
network's cross-entropy of the clean tokens at the noisy input, a masked mean, or with the
learnable loss weighting (§3) ``exp(-w(t))·CE + w(t)`` per token first.
"""

from __future__ import annotations

import torch


def masked_token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L) values over valid tokens."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def weighted_loss(per_token: torch.Tensor, log_weight: torch.Tensor | None) -> torch.Tensor:
    """Learnable loss weighting ``exp(-w)·loss + w`` with w per sequence (B,)."""
    if log_weight is None:
        return per_token
    w = log_weight.float()[:, None]
    return torch.exp(-w) * per_token + w


def denoiser_loss(network, noisy, t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                  log_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The FLM loss (docs/math.md §3), a scalar.

    ``noisy``: the network input ``x_γ @ E`` (B, L, D), or a function ``network -> x_γ @ E``
    (flow/path.noisy_input, built inside the network's forward); ``t`` (B,); ``tokens``,
    ``mask`` (B, L); ``log_weight`` (B,): the learnable loss weighting w(t), or None.
    Without weighting the masked mean is the weighted sum ``Σ (mask / Σ mask)·CE``, which the
    network's ``cross_entropy`` forms without the per-token losses.
    """
    if log_weight is None:
        m = mask.double()  # rounded to the loss's precision where it is used
        return network.cross_entropy(noisy, t, tokens, weights=m / m.sum().clamp_min(1.0))
    per_token = network.cross_entropy(noisy, t, tokens)
    return masked_token_mean(weighted_loss(per_token, log_weight), mask)
