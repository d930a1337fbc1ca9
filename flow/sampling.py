"""Samplers on the uniform alpha-space grid (docs/math.md §4-6).

A sampler is a function of (network, time table, noise, steps). The state is
kept in D-space: ``h = z @ E`` evolves linearly, so ``p @ E`` replaces ``p``
and nothing of size V outlives one chunk of positions. A network here is a
backbone with ``input_embedding`` (V, D), ``features(h, t, t2)`` and
``head(hidden, c)`` (models/dit.py); an identity ``input_embedding`` makes the
D-space state the V-space state itself (the exact-denoiser tests use that). A DiT also
has ``head(hidden, c, padded=True)`` and ``padded_embedding()``: the samplers then take
the softmax and ``p @ E`` over the padded vocabulary, whose pads carry probability 0 and
zero rows of E (aligned products, models/dit.py VOCAB_ALIGN), and argmax over V itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flow.flow_map import flow_map, probabilities, softmax_wide, vocab_padded
from flow.fused import fused_kernel
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


def _no_autocast(x: torch.Tensor):
    """Autocast off on ``x``'s device: under a bf16-autocast backbone (sample_eval's
    sampling.autocast) the projections onto E stay float32."""
    return torch.autocast(x.device.type, enabled=False)


def output_logits(network, hidden: torch.Tensor, c, padded: bool) -> torch.Tensor:
    """The network's logits for a chunk of positions: over the padded vocabulary (pads at
    PAD_LOGIT) when ``padded``, else over V."""
    return network.head(hidden, c, padded=True) if padded else network.head(hidden, c)


@fused_kernel
def probabilities_and_tokens(logits: torch.Tensor,
                             vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax of ``logits`` (..., V') over the last axis in (at least) float32, and the argmax
    over its first ``vocab`` entries: one pass over the logits when compiled (fused_kernel);
    the argmax is the same as of the float32 copy (exact, monotone)."""
    return softmax_wide(logits), logits[..., :vocab].argmax(dim=-1)


@fused_kernel
def flow_map_tokens(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                    coefficient: torch.Tensor, vocab: int) -> torch.Tensor:
    """argmax over the first ``vocab`` entries of ``softmax(teacher_logits) + coefficient ·
    student_logits`` in (at least) float32: the tokens of a flow-map sampler's last step
    (``z_N = p + ½Δ²·g``, ``coefficient`` = ½Δ² as a 0-d tensor), one pass when compiled."""
    wide = softmax_wide(teacher_logits)
    value = wide + coefficient.to(wide.dtype) * student_logits.to(wide.dtype)
    return value[..., :vocab].argmax(dim=-1)


@torch.no_grad()
def denoised_projection(network, h: torch.Tensor, t: torch.Tensor, t2: torch.Tensor | None,
                        position_chunk: int = DEFAULT_POSITION_CHUNK, project: bool = True,
                        ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """x1 prediction through E: (B, L, D) -> (softmax(f) @ E (B, L, D), argmax f (B, L)).

    The (B, chunk, V) logits exist for one chunk of positions at a time. The
    softmax and ``p @ E`` run with autocast off in float32 (float64 for a float64
    network), as the paper's sampler keeps its state float32 under a bf16
    backbone. ``project=False`` (the last step, where z = p and
    argmax z = argmax p = argmax f) returns ``(None, argmax f)`` without ``p @ E``.
    """
    hidden, c = network.features(h.to(network.input_embedding.dtype), t, t2)
    vocab, padded = network.input_embedding.shape[0], vocab_padded(network)
    e = network.padded_embedding() if padded else network.input_embedding
    proj, tokens = [], []
    for start in range(0, hidden.shape[1], position_chunk):
        logits = output_logits(network, hidden[:, start:start + position_chunk], c, padded)
        if not project:
            tokens.append(logits[..., :vocab].argmax(dim=-1))
            continue
        p, chunk_tokens = probabilities_and_tokens(logits, vocab)
        tokens.append(chunk_tokens)
        with _no_autocast(logits):  # the state update stays in the state's precision
            proj.append(p @ e.to(p.dtype))
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
    padded = vocab_padded(teacher, student)
    # [E_T | E_S], with zero rows up to the padded vocabulary when both pad
    joint = torch.cat([n.padded_embedding() if padded else n.input_embedding
                       for n in (teacher, student)], dim=1).float()
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
            logits_t = output_logits(teacher, hidden_t[:, window], c_t, padded)
            logits_s = output_logits(student, hidden_s[:, window], c_s, padded)
            if last:  # one pass over both logits, nothing (B, chunk, V) in float32 stored
                tokens.append(flow_map_tokens(logits_t, logits_s, torch.full(
                    (), 0.5 * float(delta) ** 2, dtype=torch.float64, device=h.device), vocab))
            else:
                p, g = probabilities(logits_t, torch.float32), logits_s.float()
                with _no_autocast(p):  # the state update stays in the state's precision
                    p_proj.append(p @ joint)
                    g_proj.append(g @ joint)
        if last:
            return _final_tokens(torch.cat(tokens, dim=1), known_tokens, mask)
        h = flow_map(h, torch.cat(p_proj, dim=1).to(h.dtype), torch.cat(g_proj, dim=1).to(h.dtype),
                     gamma[i].expand(batch), gamma[i + 1].expand(batch), denominator_eps)
        h = clamp_known(h, clean, mask)
    raise AssertionError("unreachable")
