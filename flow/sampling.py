"""Samplers on the uniform alpha-space grid (flm-math §4, §6).

A sampler is a function of (network, time table, noise, steps). The state is
kept in D-space: ``h = z @ E`` evolves linearly, so ``p @ E`` replaces ``p``
and nothing of size V outlives one chunk of positions. A network here is a
backbone with ``input_embedding`` (V, D), ``features(h, t, t2)`` and
``head(hidden, c)`` (models/dit.py); an identity ``input_embedding`` makes the
D-space state the V-space state itself (the exact-denoiser tests use that).
"""

from __future__ import annotations

import torch

from flow.flow_map import flow_map
from flow.path import gaussian_projection, joint_gaussian_projection
from flow.schedule import AlphaGammaTable

DEFAULT_POSITION_CHUNK = 256  # positions per output-layer chunk: bounds the (B, chunk, V) logits


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

    The (B, chunk, V) logits exist for one chunk of positions at a time. The
    softmax is float32; ``p @ E`` multiplies in the logits' dtype (bf16 for a
    bf16 / autocast backbone: a bf16 matmul with float32 accumulation, float32
    or float64 otherwise). ``project=False`` (the last step, where z = p and
    argmax z = argmax p = argmax f) returns ``(None, argmax f)`` without ``p @ E``.
    """
    hidden, c = network.features(h.to(network.input_embedding.dtype), t, t2)
    e = network.input_embedding
    proj, tokens = [], []
    for start in range(0, hidden.shape[1], position_chunk):
        logits = network.head(hidden[:, start:start + position_chunk], c)
        tokens.append(logits.argmax(dim=-1))
        if project:
            p = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype,
                                                                         torch.float32))
            proj.append(p.to(logits.dtype) @ e.to(logits.dtype))
    return (torch.cat(proj, dim=1) if project else None), torch.cat(tokens, dim=1)


@torch.no_grad()
def sample_euler(network, table: AlphaGammaTable, noise: torch.Tensor, steps: int,
                 denominator_eps: float, two_times: bool = False,
                 position_chunk: int = DEFAULT_POSITION_CHUNK) -> torch.Tensor:
    """Euler on the flow ODE (flm-math §4); returns tokens (B, L).

    ``noise``: the initial D-space state (B, L, D), its dtype is the state's
    precision. With ``two_times`` the network is a flow map f(z, t_i, t_{i+1})
    (FMLM, flm-math §6): the same update with p = softmax(f(z, t_i, t_{i+1})).
    """
    h = noise
    batch = h.shape[0]
    t, gamma = step_grid(table, steps, h.device, dtype=h.dtype)
    for i in range(steps):
        t_now = t[i].float().expand(batch)
        t_next = t[i + 1].float().expand(batch) if two_times else None
        p_proj, tokens = denoised_projection(network, h, t_now, t_next, position_chunk,
                                             project=i < steps - 1)
        if i == steps - 1:
            return tokens  # z = p at the last step; argmax z = argmax of the logits
        h = flow_map(h, p_proj.to(h.dtype), None, gamma[i].expand(batch),
                     gamma[i + 1].expand(batch), denominator_eps)
    raise AssertionError("unreachable")


@torch.no_grad()
def sample_euler_reference(logits_fn, table: AlphaGammaTable, noise: torch.Tensor, steps: int,
                           denominator_eps: float, two_times: bool = False) -> torch.Tensor:
    """The same Euler sampler with the V-space state z (B, L, V) materialised.

    ``logits_fn(z, t, t2) -> (B, L, V)``. Kept as the reference the D-space
    sampler is tested against, and for exact denoisers defined on z.
    """
    z = noise
    batch = z.shape[0]
    t, gamma = step_grid(table, steps, z.device, dtype=z.dtype)
    for i in range(steps):
        t_next = t[i + 1].float().expand(batch) if two_times else None
        p = torch.softmax(logits_fn(z, t[i].float().expand(batch), t_next).to(z.dtype), dim=-1)
        if i == steps - 1:
            return p.argmax(dim=-1)
        z = flow_map(z, p, None, gamma[i].expand(batch), gamma[i + 1].expand(batch),
                     denominator_eps)
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
                    position_chunk: int = DEFAULT_POSITION_CHUNK) -> torch.Tensor:
    """Stage-1 flow-map sampler (flm-math §5); returns tokens (B, L).

    ``z <- z + Δ_i·v_{t_i}(z) + ½Δ_i²·g(z, t_i, t_{i+1})`` with the FLM ``teacher``
    giving v and the stage-1 ``student`` giving g: 2 network calls per step. The
    state is ``z @ [E_T | E_S]`` (B, L, D_T + D_S) (``initial_joint_state``), its
    dtype the state's precision. At the last step γ = 1 and the z terms cancel:
    ``z_N = p + ½Δ²·g``.
    """
    h = noise
    batch, dim_teacher = h.shape[0], teacher.input_embedding.shape[1]
    joint = torch.cat([teacher.input_embedding, student.input_embedding], dim=1).float()
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
            p = torch.softmax(teacher.head(hidden_t[:, window], c_t).float(), dim=-1)
            g = student.head(hidden_s[:, window], c_s).float()
            if last:
                tokens.append((p + 0.5 * float(delta) ** 2 * g).argmax(dim=-1))
            else:
                p_proj.append(p @ joint)
                g_proj.append(g @ joint)
        if last:
            return torch.cat(tokens, dim=1)
        h = flow_map(h, torch.cat(p_proj, dim=1).to(h.dtype), torch.cat(g_proj, dim=1).to(h.dtype),
                     gamma[i].expand(batch), gamma[i + 1].expand(batch), denominator_eps)
    raise AssertionError("unreachable")
