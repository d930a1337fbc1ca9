"""Euler sampler: exact denoiser convergence, D-space vs V-space (docs/math.md §4)."""

import torch

from flow.sampling import initial_state, sample_euler, sample_euler_reference
from flow.schedule import AlphaGammaTable
from models.dit import DiT
from tests.helpers import ExactDenoiser, total_variation

VOCAB, LENGTH = 4, 2
EPS = 1e-5


def toy_source() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(VOCAB ** LENGTH, generator=gen) ** 3  # uneven, correlated positions
    probs[::5] = 0.0  # a few impossible sequences
    return probs / probs.sum()


def test_exact_denoiser_euler_converges_to_the_source():
    probs = toy_source()
    net = ExactDenoiser(probs, VOCAB, LENGTH)
    n = 6000
    tv = {}
    for steps in (1, 4, 64):
        gen = torch.Generator().manual_seed(steps)
        noise = initial_state(net, n, LENGTH, gen, dtype=torch.float64)
        samples = sample_euler(net, net.table, noise, steps, EPS)
        tv[steps] = total_variation(samples, probs, VOCAB)
    # sampling error alone at n=6000 over 16 outcomes is ~0.02
    assert tv[64] < 0.05, tv
    assert tv[1] > 2 * tv[64], tv  # one step collapses to per-position modes
    assert tv[4] > tv[64], tv


def test_dspace_sampler_matches_vspace_reference_on_exact_denoiser():
    probs = toy_source()
    net = ExactDenoiser(probs, VOCAB, LENGTH)
    gen = torch.Generator().manual_seed(7)
    z0 = torch.randn(500, LENGTH, VOCAB, generator=gen, dtype=torch.float64)
    a = sample_euler(net, net.table, z0, 16, EPS)  # identity E: h = z
    b = sample_euler_reference(lambda z, t, t2: net.logits(z, t), net.table, z0, 16, EPS)
    assert torch.equal(a, b)


def test_dspace_sampler_matches_vspace_reference_on_a_dit():
    torch.manual_seed(0)
    vocab, length = 12, 5
    model = DiT(vocab, length, 8, n_blocks=1, n_heads=2, cond_dim=8, dropout=0.0).double()
    with torch.no_grad():
        for p in model.output_layer.parameters():
            p.normal_(0, 0.3)
        model.input_embedding.normal_(0, 0.5)
    table = AlphaGammaTable(vocab)
    gen = torch.Generator().manual_seed(1)
    z0 = torch.randn(64, length, vocab, generator=gen, dtype=torch.float64)
    d_space = sample_euler(model, table, model.embed_state(z0), 8, EPS, position_chunk=2)
    v_space = sample_euler_reference(lambda z, t, t2: model(model.embed_state(z), t), table,
                                     z0, 8, EPS)
    assert torch.equal(d_space, v_space)


def test_two_time_network_gets_next_time():
    seen = []

    class Recorder(ExactDenoiser):
        def features(self, h, t, t2=None):
            seen.append((float(t[0]), None if t2 is None else float(t2[0])))
            return h, t

    net = Recorder(toy_source(), VOCAB, LENGTH)
    noise = torch.zeros(2, LENGTH, VOCAB, dtype=torch.float64)
    sample_euler(net, net.table, noise, 4, EPS, two_times=True)
    assert seen == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
