"""Plain V-space computations the fast D-space code is tested against (test oracles only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flow.flow_map import flow_map
from flow.sampling import _final_tokens, check_known, clamp_known, step_grid
from flow.schedule import AlphaGammaTable


def denoiser_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[x] per token: (B, L, V), (B, L) -> (B, L), float32 (float64 logits
    stay float64)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
    return ce.view_as(tokens)


@torch.no_grad()
def sample_euler_reference(logits_fn, table: AlphaGammaTable, noise: torch.Tensor, steps: int,
                           denominator_eps: float, two_times: bool = False,
                           known_tokens: torch.Tensor | None = None,
                           known_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same Euler sampler with the V-space state z (B, L, V) materialised.

    ``logits_fn(z, t, t2) -> (B, L, V)``. Kept as the reference the D-space
    sampler is tested against, and for exact denoisers defined on z. Known
    positions are clamped to the one-hot e(x_known) itself.
    """
    mask = check_known(known_tokens, known_mask, tuple(noise.shape[:2]), noise.shape[-1])
    clean = (None if mask is None else
             F.one_hot(known_tokens.clamp(0, noise.shape[-1] - 1), noise.shape[-1]))
    z = clamp_known(noise, clean, mask)
    batch = z.shape[0]
    t, gamma = step_grid(table, steps, z.device, dtype=z.dtype)
    for i in range(steps):
        t_next = t[i + 1].float().expand(batch) if two_times else None
        p = torch.softmax(logits_fn(z, t[i].float().expand(batch), t_next).to(z.dtype), dim=-1)
        if i == steps - 1:
            return _final_tokens(p.argmax(dim=-1), known_tokens, mask)
        z = clamp_known(flow_map(z, p, None, gamma[i].expand(batch), gamma[i + 1].expand(batch),
                                 denominator_eps), clean, mask)
    raise AssertionError("unreachable")



