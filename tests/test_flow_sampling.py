"""Euler sampler: exact denoiser convergence, D-space vs V-space (docs/math.md §4)."""

import torch

from flow.sampling import initial_state, sample_euler
from flow.schedule import AlphaGammaTable
from models.dit import DiT
from tests.helpers import ExactDenoiser, total_variation
from tests.oracles import sample_euler_reference

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


def test_sampling_compiled_entry_points_give_the_eager_samples():
    """speed.compile.compile_for_sampling compiles what the samplers call (features,
    denoised): the compiled network's Euler tokens and projections equal the eager network's;
    the exact denoiser is left alone."""
    from speed.compile import compile_for_sampling
    from tests.helpers import TINY_MODEL, compose_config

    config = compose_config([*TINY_MODEL, "model.length=8"])
    from models.dit import build_backbone

    torch.manual_seed(0)
    eager = build_backbone(config.model, 16, double_temb=False).eval()
    with torch.no_grad():  # a random output layer (it starts at zero) so samples depend on it
        eager.output_layer.linear.weight.normal_(0, 0.5)
    compiled = build_backbone(config.model, 16, double_temb=False).eval()
    compiled.load_state_dict(eager.state_dict())
    assert compile_for_sampling(compiled)
    # the instance's entry points are replaced by the compiled functions (the class's stay)
    entry = {"features", "denoised"}
    assert entry <= set(vars(compiled)) and not entry & set(vars(eager))
    assert not compile_for_sampling(ExactDenoiser(toy_source(), VOCAB, LENGTH))
    table = AlphaGammaTable(16)
    noise = initial_state(eager, 4, 8, torch.Generator().manual_seed(1))
    tokens = [sample_euler(net, table, noise, 3, EPS) for net in (eager, compiled)]
    assert torch.equal(tokens[0], tokens[1])
    t = torch.full((4,), 0.5)
    features = [net.features(noise, t) for net in (eager, compiled)]
    torch.testing.assert_close(features[1][0], features[0][0], rtol=1e-4, atol=1e-5)
    for got, want in zip(compiled.denoised(*features[0]), eager.denoised(*features[0])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
