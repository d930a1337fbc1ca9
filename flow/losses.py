"""The FLM denoiser objective (flm-math §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L) values over valid tokens."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def denoiser_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[x] per token: (B, L, V), (B, L) -> (B, L), float32."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none")
    return ce.view_as(tokens)


def weighted_loss(per_token: torch.Tensor, log_weight: torch.Tensor | None) -> torch.Tensor:
    """Learnable loss weighting ``exp(-w)·loss + w`` with w per sequence (B,)."""
    if log_weight is None:
        return per_token
    w = log_weight.float()[:, None]
    return torch.exp(-w) * per_token + w
