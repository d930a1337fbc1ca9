"""Flow-map algebra, interval draws, joint noise and both distillation losses (docs/math.md §5-6)."""

import copy

import pytest
import torch

from flow.flow_map import (
    MIN_INTERVAL,
    Interval,
    bootstrap_weights,
    flow_map,
    flow_map_matching_loss,
    flow_map_matching_loss_reference,
    interval_endpoints,
    semigroup_loss,
    semigroup_loss_reference,
)
from flow.path import joint_gaussian_projection
from flow.sampling import (
    denoised_projection,
    sample_euler,
    sample_flow_map,
)
from flow.schedule import AlphaGammaTable
from models.dit import DiT
from models.teacher import initialise_student
from tests.oracles import sample_euler_reference

VOCAB, LENGTH, HIDDEN = 24, 6, 8


def random_dit(seed: int, double_temb: bool) -> DiT:
    """A float64 DiT whose zero-initialised layers are randomised (non-trivial outputs)."""
    torch.manual_seed(seed)
    net = DiT(VOCAB, LENGTH, HIDDEN, n_blocks=1, n_heads=2, cond_dim=8, dropout=0.0,
              double_temb=double_temb).double()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "modulation" in name or "output_layer" in name or "time_embedding" in name:
                p.normal_(0, 0.3)
        net.input_embedding.normal_(0, 0.5)
    return net


def random_interval(table: AlphaGammaTable, batch: int, seed: int) -> Interval:
    gen = torch.Generator().manual_seed(seed)
    d, pos, bnd = torch.rand(3, batch, generator=gen, dtype=torch.float64)
    d[0] = 0.0  # clamped to MIN_INTERVAL
    s, t = interval_endpoints(d, pos, bnd, boundary_prob=3, add_boundary=True)
    s[1], t[1] = 0.0, 1.0
    return Interval.from_endpoints(table, s, t)


def test_flow_map_identity_and_euler_step():
    gen = torch.Generator().manual_seed(0)
    x, p, g = torch.randn(3, 4, LENGTH, VOCAB, generator=gen, dtype=torch.float64)
    gamma_s = torch.tensor([0.0, 0.3, 0.7, 0.95], dtype=torch.float64)
    assert torch.equal(flow_map(x, p, g, gamma_s, gamma_s), x)  # X_{s,s} = id
    gamma_t = gamma_s + torch.tensor([1.0, 0.2, 0.1, 0.05], dtype=torch.float64)
    euler = x + (gamma_t - gamma_s)[:, None, None] * (p - x) / (1 - gamma_s)[:, None, None]
    torch.testing.assert_close(flow_map(x, p, None, gamma_s, gamma_t), euler, rtol=0, atol=1e-14)
    torch.testing.assert_close(flow_map(x, p, torch.zeros_like(g), gamma_s, gamma_t), euler,
                               rtol=0, atol=1e-14)
    # from s = 0 to t = 1 the state cancels: X_{0,1}(x) = p + ½g
    ones, zeros = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    torch.testing.assert_close(flow_map(x, p, g, zeros, ones), p + 0.5 * g, rtol=0, atol=1e-14)


def test_bootstrap_weights_equal_the_two_step_composition_in_float64():
    table = AlphaGammaTable(VOCAB)
    batch = 64
    interval = random_interval(table, batch, seed=3)
    gen = torch.Generator().manual_seed(1)
    x_s, p_s, p_u, g_su, g_ut = torch.randn(5, batch, LENGTH, VOCAB, generator=gen,
                                            dtype=torch.float64)
    gs, gu, gt = (v[:, None, None] for v in (interval.gamma_s, interval.gamma_u, interval.gamma_t))
    # the composition written out in V-space, independently of flow_map
    x_u = x_s + (gu - gs) * (p_s - x_s) / (1 - gs) + 0.5 * (gu - gs) ** 2 * g_su
    x_t = x_u + (gt - gu) * (p_u - x_u) / (1 - gu) + 0.5 * (gt - gu) ** 2 * g_ut
    expected = x_s + (1 - gs) * (x_t - x_s) / (gt - gs)
    w = [v[:, None, None] for v in bootstrap_weights(interval)]
    got = w[0] * p_s + w[1] * p_u + w[2] * g_su + w[3] * g_ut
    # the literal formula divides by Δ >= ~1e-6: its round-off is ~1e-16 / Δ
    scale = (1e-13 / (gt - gs)).expand_as(got)
    assert ((got - expected).abs() <= scale + 1e-12).all()
    torch.testing.assert_close(w[0] + w[1], torch.ones_like(w[0]), rtol=0, atol=1e-14)


def test_interval_endpoints_follow_the_spec():
    n, boundary_prob = 200_000, 8
    gen = torch.Generator().manual_seed(0)
    d, pos, bnd = torch.rand(3, n, generator=gen, dtype=torch.float64)
    s, t = interval_endpoints(d, pos, bnd, boundary_prob, add_boundary=True)
    boundary = (s == 0) & (t == 1)
    frac = boundary.double().mean().item()
    sd = (1 / boundary_prob * (1 - 1 / boundary_prob) / n) ** 0.5
    assert abs(frac - 1 / boundary_prob) < 5 * sd
    inner = ~boundary
    torch.testing.assert_close(t[inner] - s[inner], d[inner].clamp_min(MIN_INTERVAL))
    assert (s >= 0).all() and (t <= 1).all()
    # s | d is uniform on [0, 1 - d]: s / (1 - d) has mean 1/2 and variance 1/12
    rel = s[inner] / (1 - d[inner].clamp_min(MIN_INTERVAL))
    assert abs(rel.mean().item() - 0.5) < 0.005 and abs(rel.var().item() - 1 / 12) < 0.003
    s2, t2 = interval_endpoints(d, pos, bnd, boundary_prob, add_boundary=False)
    assert not ((s2 == 0) & (t2 == 1)).any()


@pytest.mark.parametrize("frozen_teacher", [False, True])
@pytest.mark.parametrize("duplicated", [True, False])
def test_joint_projection_covariance_and_expected_gradient(duplicated, frozen_teacher):
    """Covariance AᵀA (also when A = [E | E] is rank deficient, as at initialisation) and
    expected gradient of E||yC||² equal to the closed form 2N·A·CCᵀ; with a frozen teacher
    block (factored apart and cached), the student block's gradient is that block of it."""
    gen = torch.Generator().manual_seed(0)
    vocab, dim = 40, 3
    e = torch.randn(vocab, dim, generator=gen, dtype=torch.float64)
    e2 = e.clone() if duplicated else e + 0.3 * torch.randn(vocab, dim, generator=gen,
                                                            dtype=torch.float64)
    a = torch.cat([e, e2], 1).requires_grad_(True)
    c = torch.randn(2 * dim, 2, generator=gen, dtype=torch.float64)
    rows, reps = 20_000, 10
    grads, covs = [], []
    teacher = a.detach()[:, :dim] if frozen_teacher else a[:, :dim]
    for r in range(reps):
        y = joint_gaussian_projection([teacher, a[:, dim:]], (rows,),
                                      torch.Generator().manual_seed(r), dtype=torch.float64)
        if duplicated:  # eps @ E twice: the two halves are one draw
            torch.testing.assert_close(y[:, :dim], y[:, dim:], rtol=0, atol=1e-10)
        covs.append(y.detach().T @ y.detach() / rows)
        (grad,) = torch.autograd.grad((y @ c).square().sum(), a)
        grads.append(grad / rows)
    gram = a.detach().T @ a.detach()
    torch.testing.assert_close(torch.stack(covs).mean(0), gram, rtol=0,
                               atol=0.03 * gram.diag().max().item())
    expected = 2 * a.detach() @ c @ c.T
    grad = torch.stack(grads).mean(0)
    if frozen_teacher:
        expected, grad = expected[:, dim:], grad[:, dim:]
        assert (torch.stack(grads)[:, :, :dim] == 0).all()
    assert torch.isfinite(grad).all()
    err = (grad - expected).norm() / expected.norm()
    assert err < 0.03, err


def _materialised_projection(eps, networks):
    return eps @ torch.cat([n.input_embedding for n in networks], 1)


def test_stage_one_dspace_loss_equals_the_materialised_loss():
    teacher, student = random_dit(0, False), random_dit(1, True)
    table = AlphaGammaTable(VOCAB)
    batch = 8
    interval = random_interval(table, batch, seed=2)
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, VOCAB, (batch, LENGTH), generator=gen)
    eps = torch.randn(batch, LENGTH, VOCAB, generator=gen, dtype=torch.float64)
    d_loss = semigroup_loss(teacher, student, tokens, interval,
                            _materialised_projection(eps, [teacher, student]))
    d_grads = torch.autograd.grad(d_loss.sum(), list(student.parameters()))
    r_loss = semigroup_loss_reference(teacher, student, tokens, interval, eps)
    r_grads = torch.autograd.grad(r_loss.sum(), list(student.parameters()))
    assert d_loss.shape == (batch, LENGTH) and (d_loss > 0).all()
    # rows with Δ ~ 1e-6 amplify the literal formula's round-off by 1/Δ
    torch.testing.assert_close(d_loss, r_loss, rtol=1e-8, atol=1e-10)
    for a, b in zip(d_grads, r_grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_stage_two_dspace_loss_equals_the_materialised_loss():
    teacher, stage_one, student = random_dit(0, False), random_dit(1, True), random_dit(2, True)
    table = AlphaGammaTable(VOCAB)
    batch = 8
    interval = random_interval(table, batch, seed=5)
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, VOCAB, (batch, LENGTH), generator=gen)
    eps = torch.randn(batch, LENGTH, VOCAB, generator=gen, dtype=torch.float64)
    nets = [teacher, stage_one, student]
    d_loss = flow_map_matching_loss(*nets, tokens, interval, _materialised_projection(eps, nets))
    d_grads = torch.autograd.grad(d_loss.sum(), list(student.parameters()))
    r_loss = flow_map_matching_loss_reference(*nets, tokens, interval, eps)
    r_grads = torch.autograd.grad(r_loss.sum(), list(student.parameters()))
    assert (d_loss > 0).all()
    torch.testing.assert_close(d_loss, r_loss, rtol=1e-10, atol=1e-12)
    for a, b in zip(d_grads, r_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_stage_two_loss_vanishes_exactly_when_the_student_is_the_stage_one_map():
    teacher = random_dit(0, False)
    stage_one = random_dit(1, True)
    initialise_student(stage_one, teacher, zero_output_layer=True)  # g = 0: the Euler map
    student = random_dit(2, True)
    initialise_student(student, teacher, zero_output_layer=False)  # = teacher
    table = AlphaGammaTable(VOCAB)
    interval = random_interval(table, 6, seed=7)
    gen = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, VOCAB, (6, LENGTH), generator=gen)
    eps = torch.randn(6, LENGTH, VOCAB, generator=gen, dtype=torch.float64)
    nets = [teacher, stage_one, student]
    loss = flow_map_matching_loss(*nets, tokens, interval, _materialised_projection(eps, nets))
    assert torch.equal(loss, torch.zeros_like(loss))
    perturbed = copy.deepcopy(student)
    with torch.no_grad():
        perturbed.output_layer.linear.bias.normal_(0, 0.3)
    nets = [teacher, stage_one, perturbed]
    loss = flow_map_matching_loss(*nets, tokens, interval, _materialised_projection(eps, nets))
    assert (loss > 1e-6).all()
    nets = [teacher, random_dit(3, True), student]  # g != 0
    loss = flow_map_matching_loss(*nets, tokens, interval, _materialised_projection(eps, nets))
    assert (loss > 1e-6).all()


def test_stage_one_sampler_with_zero_correction_is_the_teacher_euler_sampler():
    teacher = random_dit(0, False)
    student = random_dit(1, True)
    initialise_student(student, teacher, zero_output_layer=True)
    with torch.no_grad():  # a different input embedding: only g = 0 makes the samplers agree
        student.input_embedding.normal_(0, 0.5)
    table = AlphaGammaTable(VOCAB)
    eps = torch.randn(64, LENGTH, VOCAB, generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)
    for steps in (1, 3, 8):
        euler = sample_euler(teacher, table, eps @ teacher.input_embedding, steps, 1e-5,
                             position_chunk=4)
        mapped = sample_flow_map(teacher, student, table,
                                 _materialised_projection(eps, [teacher, student]), steps, 1e-5,
                                 position_chunk=4)
        assert torch.equal(euler, mapped), steps
    with torch.no_grad():
        student.output_layer.linear.bias.normal_(0, 3.0)
    mapped = sample_flow_map(teacher, student, table,
                             _materialised_projection(eps, [teacher, student]), 3, 1e-5)
    assert not torch.equal(mapped, sample_euler(teacher, table, eps @ teacher.input_embedding,
                                                3, 1e-5))


def test_euler_last_step_argmax_shortcut_gives_the_same_tokens_as_projecting():
    """The sampler skips p @ E at the last step; the tokens equal those of the full update
    written out with the V-space state (argmax of z_N = p) and those of the projected path."""
    net = random_dit(3, True)
    table = AlphaGammaTable(VOCAB)
    eps = torch.randn(32, LENGTH, VOCAB, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64)
    for steps in (1, 2, 5):
        fast = sample_euler(net, table, eps @ net.input_embedding, steps, 1e-5, two_times=True,
                            position_chunk=4)

        def logits_fn(z, t, t2):
            return net(z @ net.input_embedding, t, t2)

        slow = sample_euler_reference(logits_fn, table, eps, steps, 1e-5, two_times=True)
        assert torch.equal(fast, slow), steps
    h = eps @ net.input_embedding
    t = torch.full((32,), 0.3)
    proj, tokens = denoised_projection(net, h, t, t + 0.2, position_chunk=5)
    none, shortcut = denoised_projection(net, h, t, t + 0.2, position_chunk=5, project=False)
    assert none is None and torch.equal(tokens, shortcut)
    p = torch.softmax(net(h, t, t + 0.2), dim=-1)
    torch.testing.assert_close(proj, p @ net.input_embedding, rtol=1e-10, atol=1e-12)
    assert torch.equal(shortcut, p.argmax(-1))


def test_bf16_backbone_projection_matches_float32_within_bf16_rounding():
    net = random_dit(4, False).float()
    h = torch.randn(8, LENGTH, HIDDEN, generator=torch.Generator().manual_seed(2))
    t = torch.full((8,), 0.5)
    proj32, tokens32 = denoised_projection(net, h, t, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        proj16, tokens16 = denoised_projection(net, h, t, None)
    assert proj16.dtype == torch.float32  # bf16 backbone, float32 state update (the paper's)
    scale = net.input_embedding.abs().max()
    torch.testing.assert_close(proj16.float(), proj32, rtol=0, atol=0.05 * scale.item())
    assert (tokens16 == tokens32).float().mean() > 0.9  # bf16 logits may flip near-ties
