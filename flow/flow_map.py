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
``[E_T | E_S]`` (B, L, D_T + D_S). The losses need (B, L, V) model outputs but
never the (B, L, V) noise; ``*_reference`` versions materialise it and are kept
for tests and as ``training.input_path=reference``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flow.fused import fused_kernel
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
    ``boundary_draw < 1 / boundary_prob``.
    """
    d = length_draw.double().clamp(MIN_INTERVAL, 1.0)
    s = position_draw.double() * (1.0 - d)
    t = s + d
    if add_boundary:
        if boundary_prob < 1:
            raise ValueError(f"algo.boundary_prob={boundary_prob} must be >= 1 "
                             "(the boundary interval (0, 1) is drawn with probability 1/boundary_prob)")
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


# ---- network calls --------------------------------------------------------------------
def vocab_padded(*networks) -> bool:
    """Whether every network computes its output over the padded vocabulary (a DiT,
    models/dit.py VOCAB_ALIGN): then V-sized tensors and products stay V' wide, with aligned
    strides (bench/vocab_align.py), and nothing of a pad reaches a result."""
    return all(hasattr(n, "padded_embedding") for n in networks)


def _logits(network, h: torch.Tensor, t: torch.Tensor, t2: torch.Tensor | None = None,
            padded: bool = False, raw: bool = False) -> torch.Tensor:
    """network(h, t[, t2]) -> logits (B, L, V) in the network's output dtype (bf16 under
    autocast). ``padded`` (a DiT): over the padded V' instead, the pads at PAD_LOGIT (zero
    probability after a softmax) or, with ``raw``, at 0 (for an output that enters sums
    as it is: the stage-1 map's g)."""
    t = t.to(torch.float32)
    t2 = None if t2 is None else t2.float()
    h = h.to(network.input_embedding.dtype)
    if not padded:
        return network(h, t, t2)
    vocab = network.input_embedding.shape[0]

    def head(features, weight, bias):
        if raw:
            bias = torch.cat([bias[:vocab], bias.new_zeros(bias.shape[0] - vocab)])
        return F.linear(features, weight, bias)

    return network(h, t, t2, output=head)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (a float64 computation stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _split(h: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(h, sizes, dim=-1))


def product_dtype(like: torch.Tensor) -> torch.dtype:
    """The precision of the losses' ``p @ E`` products: autocast's dtype when it is on (the
    paper's code forms ``x_u @ E`` under bf16 autocast too), else at least float32."""
    if torch.is_autocast_enabled(like.device.type):
        return torch.get_autocast_dtype(like.device.type)
    return torch.promote_types(like.dtype, torch.float32)


def _joint_embedding(networks, padded: bool, dtype: torch.dtype) -> torch.Tensor:
    """[E_1 | E_2 | ...] (V or V', ΣD) detached, in ``dtype``: with ``padded``, each E with its
    zero pad rows (``padded_embedding``)."""
    rows = [n.padded_embedding() if padded else n.input_embedding for n in networks]
    return torch.cat([e.detach() for e in rows], dim=1).to(dtype)


def _project(v: torch.Tensor, joint: torch.Tensor) -> torch.Tensor:
    """(B, L, V or V') -> (B, L, ΣD) through ``_joint_embedding``, the product in its dtype
    (float32 accumulation), autocast off."""
    with torch.autocast(device_type=v.device.type, enabled=False):
        return v.to(joint.dtype) @ joint


# ---- the losses' elementwise algebra over (B, L, V), one fused kernel each on CUDA -------------
def softmax_wide(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last axis, computed in (at least) float32."""
    return torch.softmax(_wide(logits), dim=-1)


@fused_kernel
def probabilities(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """softmax over the last axis computed in (at least) float32, returned in ``dtype``."""
    return softmax_wide(logits).to(dtype)


@fused_kernel
def semigroup_target(logits_ps: torch.Tensor, g_su: torch.Tensor, logits_pu: torch.Tensor,
                     g_ut: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x̂_1 - p_T(x_s, s) (B, L, V) from the teacher's logits at (x_s, s) and (x_u, u), the map's
    g(x_s, s, u) and g(x_u, u, t), and ``weights`` (B, 4) = ``bootstrap_weights``: what
    ½Δ(1 - γ_s)·g(x_s, s, t) should equal."""
    w = weights.to(_wide(g_su).dtype)[:, None, None, :]
    p_s, p_u = softmax_wide(logits_ps), softmax_wide(logits_pu)
    return ((w[..., 0] - 1) * p_s + w[..., 1] * p_u
            + w[..., 2] * _wide(g_su) + w[..., 3] * _wide(g_ut))


@fused_kernel
def scaled_residual_square_sum(target: torch.Tensor, g: torch.Tensor,
                               scale: torch.Tensor) -> torch.Tensor:
    """Σ_V (target - scale·g)² (B, L); scale (B,). Differentiable in g."""
    g = _wide(g)
    return (target - scale.to(g.dtype)[:, None, None] * g).square().sum(-1)


@fused_kernel
def matching_target(logits_teacher: torch.Tensor, g: torch.Tensor, velocity_scale: torch.Tensor,
                    half_delta_sq: torch.Tensor) -> torch.Tensor:
    """Δ/(1 - γ_s)·p_T + ½Δ²·g (B, L, V): the stage-1 map's displacement, x_s terms dropped."""
    g = _wide(g)
    return (velocity_scale.to(g.dtype)[:, None, None] * softmax_wide(logits_teacher)
            + half_delta_sq.to(g.dtype)[:, None, None] * g)


@fused_kernel
def softmax_residual_square_sum(target: torch.Tensor, logits: torch.Tensor,
                                velocity_scale: torch.Tensor) -> torch.Tensor:
    """Σ_V (target - Δ/(1 - γ_s)·softmax(logits))² (B, L). Differentiable in the logits."""
    q = softmax_wide(logits)
    return (target - velocity_scale.to(q.dtype)[:, None, None] * q).square().sum(-1)


# ---- stage 1: self-consistency of the flow map (docs/math.md §5) --------------------------
def semigroup_loss(teacher, student, tokens: torch.Tensor, interval: Interval,
                   noise_projection: torch.Tensor) -> torch.Tensor:
    """Stage-1 loss per token Σ_V (x̂_1 - x̃_1)² (B, L), from D-space inputs only.

    ``noise_projection``: eps @ [E_T | E_S] (B, L, D_T + D_S). Gradients reach the
    student (through g(x_s, s, t) and x_s @ E_S); the bootstrapped target is
    computed without gradients. The x_s terms cancel (``bootstrap_weights``). Over the
    padded vocabulary when both networks pad (``vocab_padded``).
    """
    networks = [teacher, student]
    sizes = [n.input_embedding.shape[1] for n in networks]
    padded = vocab_padded(*networks)
    h_s = noisy_projection(networks, tokens, interval.gamma_s, noise_projection)
    h_teacher, h_student = _split(h_s, sizes)
    with torch.no_grad():
        logits_ps = _logits(teacher, h_teacher, interval.s, padded=padded)
        g_su = _logits(student, h_student.detach(), interval.s, interval.u, padded, raw=True)
        dtype = product_dtype(h_s)
        joint = _joint_embedding(networks, padded, dtype)  # once for both products
        h_u = flow_map(h_s.detach(), _project(probabilities(logits_ps, dtype), joint),
                       _project(g_su, joint), interval.gamma_s, interval.gamma_u)
        h_u_teacher, h_u_student = _split(h_u, sizes)
        logits_pu = _logits(teacher, h_u_teacher, interval.u, padded=padded)
        g_ut = _logits(student, h_u_student, interval.u, interval.t, padded, raw=True)
        target = semigroup_target(logits_ps, g_su, logits_pu, g_ut,
                                  torch.stack(bootstrap_weights(interval), dim=1))
        del logits_ps, g_su, logits_pu, g_ut
    g_st = _logits(student, h_student, interval.s, interval.t, padded, raw=True)
    scale = 0.5 * (interval.gamma_t - interval.gamma_s) * (1 - interval.gamma_s)
    return scaled_residual_square_sum(target, g_st, scale)


def _probs(network, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return softmax_wide(_logits(network, h, t))


def semigroup_loss_reference(teacher, student, tokens: torch.Tensor, interval: Interval,
                             noise: torch.Tensor) -> torch.Tensor:
    """The stage-1 loss written literally in V-space with the noise eps (B, L, V) materialised."""
    vocab = noise.shape[-1]
    gs, gu, gt = interval.gamma_s, interval.gamma_u, interval.gamma_t
    x_s = noisy_projection_reference(tokens, gs, noise, vocab)
    with torch.autocast(device_type=noise.device.type, enabled=False):
        h_teacher, h_student = teacher.embed_state(x_s), student.embed_state(x_s)
    with torch.no_grad():
        p_s = _probs(teacher, h_teacher, interval.s)
        g_su = _wide(_logits(student, h_student.detach(), interval.s, interval.u))
        x_u = flow_map(x_s, p_s, g_su, gs, gu)
        with torch.autocast(device_type=noise.device.type, enabled=False):
            hu_teacher, hu_student = teacher.embed_state(x_u), student.embed_state(x_u)
        x_t = flow_map(x_u, _probs(teacher, hu_teacher, interval.u),
                       _wide(_logits(student, hu_student, interval.u, interval.t)), gu, gt)
        average_velocity = (x_t - x_s) / _per_sequence(gt - gs, x_s)
        x1_bootstrap = x_s + _per_sequence(1 - gs, x_s) * average_velocity
    x1_student = student_clean_estimate(
        p_s, _wide(_logits(student, h_student, interval.s, interval.t)), interval)
    return (x1_bootstrap - x1_student).square().sum(-1)


# ---- stage 2: regression of a one-network map on the stage-1 map (docs/math.md §6) --------
def flow_map_matching_loss(teacher, map_model, student, tokens: torch.Tensor,
                           interval: Interval, noise_projection: torch.Tensor) -> torch.Tensor:
    """Stage-2 loss per token Σ_V (X_{s,t}(x_s) - X̃_{s,t}(x_s))² (B, L), D-space inputs.

    ``noise_projection``: eps @ [E_T | E_G | E_S] for the FLM teacher, the stage-1 map
    g and the student. The x_s terms cancel: the difference is
    Δ/(1 - γ_s)·(p_T - softmax f) + ½Δ²·g. Over the padded vocabulary when all three pad.
    """
    networks = [teacher, map_model, student]
    sizes = [n.input_embedding.shape[1] for n in networks]
    padded = vocab_padded(*networks)
    h_s = noisy_projection(networks, tokens, interval.gamma_s, noise_projection)
    h_teacher, h_map, h_student = _split(h_s, sizes)
    delta = interval.gamma_t - interval.gamma_s
    velocity_scale = delta / (1 - interval.gamma_s)
    with torch.no_grad():
        target = matching_target(_logits(teacher, h_teacher, interval.s, padded=padded),
                                 _logits(map_model, h_map, interval.s, interval.t, padded,
                                         raw=True),
                                 velocity_scale, 0.5 * delta ** 2)
    return softmax_residual_square_sum(
        target, _logits(student, h_student, interval.s, interval.t, padded=padded),
        velocity_scale)


def flow_map_matching_loss_reference(teacher, map_model, student, tokens: torch.Tensor,
                                     interval: Interval, noise: torch.Tensor) -> torch.Tensor:
    """The stage-2 loss written literally in V-space with eps (B, L, V) materialised."""
    gs, gt = interval.gamma_s, interval.gamma_t
    x_s = noisy_projection_reference(tokens, gs, noise, noise.shape[-1])
    with torch.autocast(device_type=noise.device.type, enabled=False):
        h = [n.embed_state(x_s) for n in (teacher, map_model, student)]
    with torch.no_grad():
        stage_one = flow_map(x_s, _probs(teacher, h[0], interval.s),
                             _wide(_logits(map_model, h[1], interval.s, interval.t)), gs, gt)
    q = torch.softmax(_wide(_logits(student, h[2], interval.s, interval.t)), dim=-1)
    return (stage_one - flow_map(x_s, q, None, gs, gt)).square().sum(-1)
