"""Learnable loss weighting w_phi(t) or w_phi(s, t) (docs/math.md §3, §5)."""

from __future__ import annotations

import torch
from torch import nn

from models.dit import TIME_FREQUENCY_DIM, sinusoidal_features


class LossWeighting(nn.Module):
    """Small MLP on time features -> log-weight w per sequence (B,).

    The last layer is zero-initialised, so training starts unweighted (w = 0).
    """

    def __init__(self, width: int, num_times: int = 1) -> None:
        super().__init__()
        self.num_times = num_times
        self.mlp = nn.Sequential(nn.Linear(num_times * TIME_FREQUENCY_DIM, width), nn.SiLU(),
                                 nn.Linear(width, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, *times: torch.Tensor) -> torch.Tensor:
        if len(times) != self.num_times:
            raise ValueError(f"LossWeighting built for {self.num_times} times, got {len(times)}")
        features = torch.cat([sinusoidal_features(t) for t in times], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype)).squeeze(-1)
