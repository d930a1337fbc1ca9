"""Samplers on the uniform alpha-space grid (docs/math.md §4-6).

A sampler is a function of (network, time table, noise, steps). The state is
kept in D-space: ``h = z @ E`` evolves linearly, so ``p @ E`` replaces ``p``
and nothing of size V outlives one chunk of positions. A network here has
``input_embedding`` (V, D), ``features(h, t, t2)`` -> (hidden, c), and per chunk of
positions ``head(hidden, c)`` (logits (B, L', V)), ``denoised(hidden, c, project)``
(``softmax(f) @ E`` and ``argmax f``) and ``project(v) = v @ E`` (models/dit.py); an
identity ``input_embedding`` makes the D-space state the V-space state itself (the exact
denoiser).
"""

from __future__ import annotations

import torch

from flow.flow_map import flow_map, softmax_wide
from flow.path import clean_projection, gaussian_projection, joint_gaussian_projection
from flow.schedule import AlphaGammaTable

DEFAULT_POSITION_CHUNK = 256  # positions per output-layer chunk: bounds the (B, chunk, V) logits


def check_known(known_tokens: torch.Tensor | None, known_mask: torch.Tensor | None,
                shape: tuple[int, int], vocab: int) -> torch.Tensor | None:
    """Validate the conditioning pair; returns the mask (B, L) bool, or None (unconditional).

    ``known_tokens`` (B, L) long and ``known_mask`` (B, L) bool come together; tokens at
    unknown positions are ignored, those at known positions must lie in [0, vocab).
    """
    if known_tokens is None and known_mask is None:
        return None
    if known_tokens is None or known_mask is None:
        raise ValueError("pass known_tokens and known_mask together (or neither)")
    if tuple(known_tokens.shape) != shape or tuple(known_mask.shape) != shape:
        raise ValueError(f"known_tokens {tuple(known_tokens.shape)} and known_mask "
                         f"{tuple(known_mask.shape)} must both have the state's (B, L) = {shape}")
    mask = known_mask.bool()
    if bool((((known_tokens < 0) | (known_tokens >= vocab)) & mask).any()):
        raise ValueError(f"known_tokens has ids outside the vocabulary [0, {vocab}) at known "
                         "positions")
    return mask


def clamp_known(h: torch.Tensor, clean: torch.Tensor | None, mask: torch.Tensor | None,
                ) -> torch.Tensor:
    """Known positions of the state set to their clean one-hot through E (docs/math.md §9).

    h: (B, L, D) state; clean: (B, L, D) = E[known_tokens]; mask: (B, L). No-op without a mask.
    """
    if mask is None:
        return h
    return torch.where(mask[..., None], clean.to(h.dtype), h)


def _clean_projection(networks, known_tokens: torch.Tensor | None,
                      mask: torch.Tensor | None) -> torch.Tensor | None:
    """e(x_known) @ [E_1 | ...] (flow/path.clean_projection): (B, L) -> (B, L, ΣD), or None
    without conditioning; ids at unknown positions are only clamped into the vocabulary."""
    if mask is None:
        return None
    vocab = networks[0].input_embedding.shape[0]
    return clean_projection(networks, known_tokens.clamp(0, vocab - 1))


def _final_tokens(tokens: torch.Tensor, known_tokens: torch.Tensor | None,
                  mask: torch.Tensor | None) -> torch.Tensor:
    return tokens if mask is None else torch.where(mask, known_tokens.to(tokens.dtype), tokens)


def step_grid(table: AlphaGammaTable, steps: int, device: torch.device,
              dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """t_i = i / N (i = 0..N) in alpha-space and gamma_i = gamma(t_i), both (N + 1,)."""
    if steps < 1:
        raise ValueError(f"sampling.steps entries must be >= 1, got {steps}")
    t = torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=torch.float64)
    return t.to(dtype), table.to(device).gamma_of_alpha(t).to(dtype)


def initial_state(network, batch_size: int, length: int, generator: torch.Generator | None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """z ~ N(0, I_V) seen through E: (B, L, D) draw of ``z @ E``.

    Drawn in float64 whatever the state's precision, so that float32 and
    float64 runs with one seed start from the same point.
    """
    return gaussian_projection(network.input_embedding.detach(), (batch_size, length),
                               generator, dtype=torch.float64).to(dtype)


@torch.no_grad()
def denoised_projection(network, h: torch.Tensor, t: torch.Tensor, t2: torch.Tensor | None,
                        position_chunk: int = DEFAULT_POSITION_CHUNK, project: bool = True,
                        ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """x1 prediction through E: (B, L, D) -> (softmax(f) @ E (B, L, D), argmax f (B, L)).

    The network's ``denoised`` on one chunk of positions at a time, so that the
    (B, chunk, V) logits exist for one chunk only. ``project=False`` (the last step, where
    z = p and argmax z = argmax p = argmax f) returns ``(None, argmax f)`` without ``p @ E``.
    With the product, the logits and p of a chunk exist together: chunks of half as many
    positions then, which keeps the product steps' (B, chunk, V) tensors near the size of
    the last step's logits.
    """
    hidden, c = network.features(h.to(network.input_embedding.dtype), t, t2)
    chunk = max(1, position_chunk // 2) if project else position_chunk
    proj, tokens = [], []
    for start in range(0, hidden.shape[1], chunk):
        p_proj, chunk_tokens = network.denoised(hidden[:, start:start + chunk], c, project)
        proj.append(p_proj)
        tokens.append(chunk_tokens)
    return (torch.cat(proj, dim=1) if project else None), torch.cat(tokens, dim=1)


@torch.no_grad()
def sample_euler(network, table: AlphaGammaTable, noise: torch.Tensor, steps: int,
                 denominator_eps: float, two_times: bool = False,
                 position_chunk: int = DEFAULT_POSITION_CHUNK,
                 known_tokens: torch.Tensor | None = None,
                 known_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Euler on the flow ODE (docs/math.md §4); returns tokens (B, L).

    ``noise``: the initial D-space state (B, L, D), its dtype is the state's
    precision. With ``two_times`` the network is a flow map f(z, t_i, t_{i+1})
    (FMLM, docs/math.md §6): the same update with p = softmax(f(z, t_i, t_{i+1})).
    ``known_tokens``/``known_mask`` (B, L): the known positions are clamped to their
    clean one-hot (through E) at the start and after every step, and returned as given
    (docs/math.md §9).
    """
    mask = check_known(known_tokens, known_mask, tuple(noise.shape[:2]),
                       network.input_embedding.shape[0])
    clean = _clean_projection([network], known_tokens, mask)
    h = clamp_known(noise, clean, mask)
    batch = h.shape[0]
    t, gamma = step_grid(table, steps, h.device, dtype=h.dtype)
    for i in range(steps):
        t_now = t[i].float().expand(batch)
        t_next = t[i + 1].float().expand(batch) if two_times else None
        p_proj, tokens = denoised_projection(network, h, t_now, t_next, position_chunk,
                                             project=i < steps - 1)
        if i == steps - 1:
            # z = p at the last step; argmax z = argmax of the logits
            return _final_tokens(tokens, known_tokens, mask)
        h = clamp_known(flow_map(h, p_proj.to(h.dtype), None, gamma[i].expand(batch),
                                 gamma[i + 1].expand(batch), denominator_eps), clean, mask)
    raise AssertionError("unreachable")


def initial_joint_state(networks, batch_size: int, length: int,
                        generator: torch.Generator | None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """z ~ N(0, I_V) seen through every network's embedding: (B, L, ΣD_i) = z @ [E_1 | ...]."""
    embeddings = [n.input_embedding.detach() for n in networks]
    return joint_gaussian_projection(embeddings, (batch_size, length), generator,
                                     dtype=torch.float64).to(dtype)


@torch.no_grad()
def sample_flow_map(teacher, student, table: AlphaGammaTable, noise: torch.Tensor, steps: int,
                    denominator_eps: float,
                    position_chunk: int = DEFAULT_POSITION_CHUNK,
                    known_tokens: torch.Tensor | None = None,
                    known_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Stage-1 flow-map sampler (docs/math.md §5); returns tokens (B, L).

    ``z <- z + Δ_i·v_{t_i}(z) + ½Δ_i²·g(z, t_i, t_{i+1})`` with the FLM ``teacher``
    giving v and the stage-1 ``student`` giving g: 2 network calls per step. The
    state is ``z @ [E_T | E_S]`` (B, L, D_T + D_S) (``initial_joint_state``), its
    dtype the state's precision. At the last step γ = 1 and the z terms cancel:
    ``z_N = p + ½Δ²·g``. Known positions (``known_tokens``/``known_mask`` (B, L)) are
    clamped to ``e(x_known) @ [E_T | E_S]`` as in ``sample_euler``.
    """
    batch, (vocab, dim_teacher) = noise.shape[0], teacher.input_embedding.shape
    mask = check_known(known_tokens, known_mask, tuple(noise.shape[:2]), vocab)
    clean = _clean_projection([teacher, student], known_tokens, mask)
    h = clamp_known(noise, clean, mask)
    t, gamma = step_grid(table, steps, h.device, dtype=h.dtype)
    for i in range(steps):
        t_now, t_next = t[i].float().expand(batch), t[i + 1].float().expand(batch)
        hidden_t, c_t = teacher.features(h[..., :dim_teacher].to(teacher.input_embedding.dtype),
                                         t_now)
        hidden_s, c_s = student.features(h[..., dim_teacher:].to(student.input_embedding.dtype),
                                         t_now, t_next)
        delta = gamma[i + 1] - gamma[i]
        last = i == steps - 1
        p_proj, g_proj, tokens = [], [], []
        for start in range(0, h.shape[1], position_chunk):
            window = slice(start, start + position_chunk)
            logits_t = teacher.head(hidden_t[:, window], c_t)
            logits_s = student.head(hidden_s[:, window], c_s)
            p = softmax_wide(logits_t)
            if last:
                z = p + 0.5 * float(delta) ** 2 * logits_s.to(p.dtype)
                tokens.append(z.argmax(dim=-1))
            else:  # the state update in float32, whatever the backbones' autocast
                p_proj.append(torch.cat([n.project(p.float()) for n in (teacher, student)], -1))
                g_proj.append(torch.cat([n.project(logits_s.float()) for n in (teacher, student)],
                                        -1))
        if last:
            return _final_tokens(torch.cat(tokens, dim=1), known_tokens, mask)
        h = flow_map(h, torch.cat(p_proj, dim=1).to(h.dtype), torch.cat(g_proj, dim=1).to(h.dtype),
                     gamma[i].expand(batch), gamma[i + 1].expand(batch), denominator_eps)
        h = clamp_known(h, clean, mask)
    raise AssertionError("unreachable")
