"""Flow-map algebra and the two distillation objectives (docs/math.md §5-6).

The flow map ``X_{s,t}`` sends a state at time ``s`` to time ``t``. With
``Δ = γ_t - γ_s`` and the teacher velocity ``v_s(x) = (p_T(x, s) - x) / (1 - γ_s)``:

* stage 1 (``flm_distill``): ``X_{s,t}(x) = x + Δ·v_s(x) + ½Δ²·g(x, s, t)``,
  trained by self-consistency of the map over ``[s, u]`` and ``[u, t]``;
* stage 2 (``flm_distill_second``, FMLM): ``X̃_{s,t}(x) = x + Δ·(softmax f(x, s, t) - x) / (1 - γ_s)``
  regressed on the stage-1 map.

Every map here is affine in ``(x, p, g)``, so the same functions act on
V-space states (B, L, V) and on their projections ``x @ E`` (B, L, D). Networks
(teacher, students) see only projections; teacher and student have different
input embeddings, so a state is carried through the concatenation
``[E_T | E_S]`` (B, L, D_T + D_S). A network here has ``input_embedding`` (V, D),
``logits(h, t, t2=None)`` (B, L, V) and ``project(v) = v @ E`` (models/dit.py). The losses
need (B, L, V) model outputs but never the (B, L, V) noise; the ``*_reference`` versions
materialise it (``training.input_path=reference``). Each loss is one function, compiled
whole from outside when compiling (speed.compile.compile_loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flow.path import noisy_projection, noisy_projection_reference
from flow.schedule import AlphaGammaTable

MIN_INTERVAL = 1e-6  # d = t - s is clamped below at this (docs/math.md §5)


# ---- times ----------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """Per-sequence times in alpha-space (B,) and their gammas (B,), float64."""

    s: torch.Tensor
    u: torch.Tensor
    t: torch.Tensor
    gamma_s: torch.Tensor
    gamma_u: torch.Tensor
    gamma_t: torch.Tensor

    @classmethod
    def from_endpoints(cls, table: AlphaGammaTable, s: torch.Tensor, t: torch.Tensor,
                       ) -> Interval:
        """The interval [s, t] with its midpoint u = (s + t) / 2 (in alpha-space)."""
        s, t = s.double(), t.double()
        u = 0.5 * (s + t)
        table = table.to(s.device)
        return cls(s, u, t, table.gamma_of_alpha(s), table.gamma_of_alpha(u),
                   table.gamma_of_alpha(t))


def interval_endpoints(length_draw: torch.Tensor, position_draw: torch.Tensor,
                       boundary_draw: torch.Tensor, boundary_prob: float, add_boundary: bool,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) from three U[0, 1) draws per sequence (B,) (docs/math.md §5).

    ``d = max(length_draw, MIN_INTERVAL)``, ``s = position_draw·(1 - d)``,
    ``t = s + d``; with ``add_boundary``, ``(s, t) = (0, 1)`` where
    ``boundary_draw < 1 / boundary_prob`` (``boundary_prob >= 1``, checked with the config
    by flow/registry.py).
    """
    d = length_draw.double().clamp(MIN_INTERVAL, 1.0)
    s = position_draw.double() * (1.0 - d)
    t = s + d
    if add_boundary:
        boundary = boundary_draw < 1.0 / boundary_prob
        s = torch.where(boundary, torch.zeros_like(s), s)
        t = torch.where(boundary, torch.ones_like(t), t)
    return s, t


def _per_sequence(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) in ``like``'s dtype, to broadcast over (B, L, ·)."""
    return value.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


# ---- the maps -----------------------------------------------------------------------
def teacher_velocity(x: torch.Tensor, p: torch.Tensor, gamma_s: torch.Tensor,
                     denominator_eps: float = 0.0) -> torch.Tensor:
    """v_s(x) = (p - x) / (1 - γ_s [+ δ]); x, p: (B, L, ·), gamma_s: (B,)."""
    return (p - x) / (1 - _per_sequence(gamma_s, x) + denominator_eps)


def flow_map(x: torch.Tensor, p: torch.Tensor, g: torch.Tensor | None, gamma_s: torch.Tensor,
             gamma_t: torch.Tensor, denominator_eps: float = 0.0) -> torch.Tensor:
    """X_{s,t}(x) = x + Δ·v_s(x) + ½Δ²·g (docs/math.md §5); g = None is one Euler step.

    Affine in (x, p, g): pass ``x @ E``, ``p @ E``, ``g @ E`` to get ``X_{s,t}(x) @ E``.
    """
    delta = _per_sequence(gamma_t - gamma_s, x)
    out = x + delta * teacher_velocity(x, p, gamma_s, denominator_eps)
    if g is not None:
        out = out + 0.5 * delta ** 2 * g
    return out


def bootstrap_weights(interval: Interval) -> tuple[torch.Tensor, ...]:
    """Weights (w_ps, w_pu, w_gsu, w_gut), each (B,), of the bootstrapped clean estimate

        x̂_1 = x_s + (1 - γ_s)·(X_{u,t}(X_{s,u}(x_s)) - x_s) / Δ
            = w_ps·p_T(x_s, s) + w_pu·p_T(x_u, u) + w_gsu·g(x_s, s, u) + w_gut·g(x_u, u, t)

    (expand both maps: the coefficient of x_s is 0, and w_ps + w_pu = 1). Written with the
    ratios Δ_1/Δ, Δ_2/Δ so that short intervals cost no cancellation.
    """
    gs, gu, gt = interval.gamma_s, interval.gamma_u, interval.gamma_t
    delta, first, second = gt - gs, gu - gs, gt - gu
    positive = delta > 0
    safe = torch.where(positive, delta, torch.ones_like(delta))
    r1 = torch.where(positive, first / safe, torch.full_like(delta, 0.5))
    r2 = torch.where(positive, second / safe, torch.full_like(delta, 0.5))
    w_ps = (1 - gt) / (1 - gu) * r1
    w_pu = (1 - gs) / (1 - gu) * r2
    w_gsu = (1 - gs) * (1 - gt) / (1 - gu) * 0.5 * first * r1
    w_gut = (1 - gs) * 0.5 * second * r2
    return w_ps, w_pu, w_gsu, w_gut


def student_clean_estimate(p_s: torch.Tensor, g_st: torch.Tensor, interval: Interval,
                           ) -> torch.Tensor:
    """x̃_1 = p_T(x_s, s) + ½·Δ·(1 - γ_s)·g(x_s, s, t): (B, L, V)."""
    scale = 0.5 * (interval.gamma_t - interval.gamma_s) * (1 - interval.gamma_s)
    return p_s + _per_sequence(scale, g_st) * g_st


# ---- helpers --------------------------------------------------------------------------
def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (a float64 computation stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def softmax_wide(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last axis, computed in (at least) float32."""
    return torch.softmax(_wide(logits), dim=-1)


def _split(h: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(h, sizes, dim=-1))


def product_dtype(like: torch.Tensor) -> torch.dtype:
    """The precision of the losses' ``p @ E`` products: autocast's dtype when it is on (the
    paper's code forms ``x_u @ E`` under bf16 autocast too), else at least float32."""
    if torch.is_autocast_enabled(like.device.type):
        return torch.get_autocast_dtype(like.device.type)
    return torch.promote_types(like.dtype, torch.float32)


def joint_projection(networks, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v @ [E_1 | E_2 | ...]``: (B, L, V) -> (B, L, ΣD), the products in ``dtype``."""
    v = v.to(dtype)
    return torch.cat([n.project(v) for n in networks], dim=-1)


# ---- stage 1: self-consistency of the flow map (docs/math.md §5) --------------------------
def semigroup_loss(teacher, student, tokens: torch.Tensor, interval: Interval,
                   noise_projection: torch.Tensor) -> torch.Tensor:
    """Stage-1 loss per token Σ_V (x̂_1 - x̃_1)² (B, L), from D-space inputs only.

    ``noise_projection``: eps @ [E_T | E_S] (B, L, D_T + D_S). The state x_s is carried as
    ``x_s @ [E_T | E_S]``. The bootstrapped clean estimate x̂_1 (two half steps of the map,
    ``bootstrap_weights``) is computed without gradients; the student's own estimate
    x̃_1 = p_T(x_s, s) + ½Δ(1 - γ_s)·g(x_s, s, t) takes them. Both contain p_T(x_s, s), so
    the residual is ``(x̂_1 - p_T(x_s, s)) - ½Δ(1 - γ_s)·g(x_s, s, t)``.
    """
    networks = [teacher, student]
    sizes = [n.input_embedding.shape[1] for n in networks]
    h_s = noisy_projection(networks, tokens, interval.gamma_s, noise_projection)
    h_teacher, h_student = _split(h_s, sizes)
    dtype = product_dtype(h_s)
    with torch.no_grad():
        p_s = softmax_wide(teacher.logits(h_teacher, interval.s))
        g_su = _wide(student.logits(h_student.detach(), interval.s, interval.u))
        h_u = flow_map(h_s.detach(), joint_projection(networks, p_s, dtype),
                       joint_projection(networks, g_su, dtype),
                       interval.gamma_s, interval.gamma_u)
        h_u_teacher, h_u_student = _split(h_u, sizes)
        p_u = softmax_wide(teacher.logits(h_u_teacher, interval.u))
        g_ut = _wide(student.logits(h_u_student, interval.u, interval.t))
        w_ps, w_pu, w_gsu, w_gut = (_per_sequence(w, p_s) for w in bootstrap_weights(interval))
        bootstrap_minus_p_s = (w_ps - 1) * p_s + w_pu * p_u + w_gsu * g_su + w_gut * g_ut
    g_st = _wide(student.logits(h_student, interval.s, interval.t))
    scale = 0.5 * (interval.gamma_t - interval.gamma_s) * (1 - interval.gamma_s)
    return (bootstrap_minus_p_s - _per_sequence(scale, g_st) * g_st).square().sum(-1)


def semigroup_loss_reference(teacher, student, tokens: torch.Tensor, interval: Interval,
                             noise: torch.Tensor) -> torch.Tensor:
    """The stage-1 loss written literally in V-space with the noise eps (B, L, V) materialised
    (``training.input_path=reference``)."""
    vocab = noise.shape[-1]
    gs, gu, gt = interval.gamma_s, interval.gamma_u, interval.gamma_t
    x_s = noisy_projection_reference(tokens, gs, noise, vocab)
    with torch.autocast(device_type=noise.device.type, enabled=False):
        h_teacher, h_student = teacher.embed_state(x_s), student.embed_state(x_s)
    with torch.no_grad():
        p_s = softmax_wide(teacher.logits(h_teacher, interval.s))
        g_su = _wide(student.logits(h_student.detach(), interval.s, interval.u))
        x_u = flow_map(x_s, p_s, g_su, gs, gu)
        with torch.autocast(device_type=noise.device.type, enabled=False):
            hu_teacher, hu_student = teacher.embed_state(x_u), student.embed_state(x_u)
        x_t = flow_map(x_u, softmax_wide(teacher.logits(hu_teacher, interval.u)),
                       _wide(student.logits(hu_student, interval.u, interval.t)), gu, gt)
        average_velocity = (x_t - x_s) / _per_sequence(gt - gs, x_s)
        x1_bootstrap = x_s + _per_sequence(1 - gs, x_s) * average_velocity
    x1_student = student_clean_estimate(
        p_s, _wide(student.logits(h_student, interval.s, interval.t)), interval)
    return (x1_bootstrap - x1_student).square().sum(-1)


# ---- stage 2: regression of a one-network map on the stage-1 map (docs/math.md §6) --------
def flow_map_matching_loss(teacher, map_model, student, tokens: torch.Tensor,
                           interval: Interval, noise_projection: torch.Tensor) -> torch.Tensor:
    """Stage-2 loss per token Σ_V (X_{s,t}(x_s) - X̃_{s,t}(x_s))² (B, L), D-space inputs.

    ``noise_projection``: eps @ [E_T | E_G | E_S] for the FLM teacher, the stage-1 map
    g and the student. The target X_{s,t}(x_s) (teacher and map, no gradients) against the
    student's one-network map X̃_{s,t}(x_s); the x_s terms of both cancel, leaving
    ``Δ/(1 - γ_s)·p_T + ½Δ²·g`` against ``Δ/(1 - γ_s)·softmax f``.
    """
    networks = [teacher, map_model, student]
    h_teacher, h_map, h_student = _split(
        noisy_projection(networks, tokens, interval.gamma_s, noise_projection),
        [n.input_embedding.shape[1] for n in networks])
    delta = interval.gamma_t - interval.gamma_s
    velocity_scale = delta / (1 - interval.gamma_s)
    with torch.no_grad():
        p = softmax_wide(teacher.logits(h_teacher, interval.s))
        g = _wide(map_model.logits(h_map, interval.s, interval.t))
        displacement = _per_sequence(velocity_scale, p) * p + _per_sequence(0.5 * delta ** 2, g) * g
    q = softmax_wide(student.logits(h_student, interval.s, interval.t))
    return (displacement - _per_sequence(velocity_scale, q) * q).square().sum(-1)


def flow_map_matching_loss_reference(teacher, map_model, student, tokens: torch.Tensor,
                                     interval: Interval, noise: torch.Tensor) -> torch.Tensor:
    """The stage-2 loss written literally in V-space with eps (B, L, V) materialised
    (``training.input_path=reference``)."""
    gs, gt = interval.gamma_s, interval.gamma_t
    x_s = noisy_projection_reference(tokens, gs, noise, noise.shape[-1])
    with torch.autocast(device_type=noise.device.type, enabled=False):
        h = [n.embed_state(x_s) for n in (teacher, map_model, student)]
    with torch.no_grad():
        stage_one = flow_map(x_s, softmax_wide(teacher.logits(h[0], interval.s)),
                             _wide(map_model.logits(h[1], interval.s, interval.t)), gs, gt)
    q = softmax_wide(student.logits(h[2], interval.s, interval.t))
    return (stage_one - flow_map(x_s, q, None, gs, gt)).square().sum(-1)
