"""Sampling diagnostics (evaluation/diagnostics.py): trajectory and data KL against
enumeration of every sequence of a tiny source, the hybrid sampler at its two end bands
against the network and the exact samplers."""

from __future__ import annotations

import pytest
import torch

import algo
import data
from algo import resolve_config
from algo.oracle import OracleSampler
from data.synthetic import SyntheticSource, all_sequences
from evaluation import diagnostics
from evaluation.diagnostics import HybridNetwork, StateSpaceNetwork, data_kl, trajectory_kl
from evaluation.network_wrappers import swapped_prediction_network
from models.dit import build_backbone
from models.exact_denoiser import ExactDenoiser
from runtime.config import ConfigError
from tests.helpers import ExactDenoiser as EnumeratedDenoiser
from tests.helpers import compose_config
from tests.oracles import sample_euler_reference

VOCAB, LENGTH = 3, 3


def tiny_source() -> SyntheticSource:
    return SyntheticSource("markov", vocab_size=VOCAB, num_successors=2, source_seed=1)


def tiny_network() -> torch.nn.Module:
    cfg = compose_config(["model.length=3", "model.hidden_size=16", "model.n_heads=2",
                          "model.n_blocks=1", "model.cond_dim=8"]).model
    torch.manual_seed(0)
    net = build_backbone(cfg, VOCAB, double_temb=False)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return net.eval()


def enumerated_kl(z, t, net, enumerated):
    """KL(exact || net) per position with the posterior by enumeration (tests/helpers.py)."""
    log_p = enumerated.logits(z, t)
    log_q = torch.log_softmax(net.logits_from_state(z.float(), t).double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _bins(records):
    sums, counts = [0.0] * 10, [0] * 10
    for kl, t in records:
        k = min(int(float(t) * 10), 9)
        sums[k] += float(kl.sum())
        counts[k] += kl.numel()
    return [s / c if c else None for s, c in zip(sums, counts)]


@pytest.mark.parametrize("steps", [4, 13])
def test_trajectory_kl_matches_enumeration_along_the_reference_sampler(steps):
    source, net = tiny_source(), tiny_network()
    exact = ExactDenoiser(source)
    probs = source.log_prob(all_sequences(VOCAB, LENGTH)).exp()
    enumerated = EnumeratedDenoiser(probs, VOCAB, LENGTH)
    noise = torch.randn(5, LENGTH, VOCAB, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64)
    records = []

    def logits_fn(z, t, t2):  # the V-space reference sampler, driven by the network
        records.append((enumerated_kl(z, t, net, enumerated), t[0]))
        return net.logits_from_state(z.float(), t)

    sample_euler_reference(logits_fn, exact.table, noise, steps, 1e-6)
    want = _bins(records)
    got = trajectory_kl(StateSpaceNetwork(net, exact.input_embedding), net, exact, steps, noise,
                        1e-6)
    assert [g is None for g in got] == [w is None for w in want]
    assert [g for g in got if g is not None] == pytest.approx(
        [w for w in want if w is not None], rel=1e-6, abs=1e-9)


def test_data_kl_matches_enumeration_and_is_zero_for_the_exact_denoiser():
    source, net = tiny_source(), tiny_network()
    exact = ExactDenoiser(source)
    enumerated = EnumeratedDenoiser(source.log_prob(all_sequences(VOCAB, LENGTH)).exp(),
                                    VOCAB, LENGTH)
    tokens = source.sample(6, LENGTH, torch.Generator().manual_seed(4))
    steps = 7
    got = data_kl(net, exact, tokens, steps, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the same draws: one ε per grid time
    records = []
    for i in range(steps):
        t = torch.full((6,), i / steps, dtype=torch.float64)
        gamma = exact.table.gamma_of_alpha(t)[0]
        eps = torch.randn(6, LENGTH, VOCAB, generator=g, dtype=torch.float64)
        z = (1 - gamma) * eps + gamma * torch.nn.functional.one_hot(tokens, VOCAB).double()
        records.append((enumerated_kl(z, t.float(), net, enumerated), i / steps))
    want = _bins(records)
    assert [g is None for g in got] == [w is None for w in want]
    assert [g for g in got if g is not None] == pytest.approx(
        [w for w in want if w is not None], rel=1e-6, abs=1e-9)
    # the exact denoiser against itself: KL 0 on data and on its own trajectory
    zero = data_kl(exact, exact, tokens, steps, torch.Generator().manual_seed(5))
    assert max(v for v in zero if v is not None) == pytest.approx(0.0, abs=1e-9)
    noise = torch.randn(4, LENGTH, VOCAB, dtype=torch.float64)
    own = trajectory_kl(exact, exact, exact, steps, noise, 1e-6)
    assert max(v for v in own if v is not None) == pytest.approx(0.0, abs=1e-9)


# ---- the hybrid sampler on a trained-shaped FLM module -------------------------------------
FLM = ["algo=flm", "data=synthetic", "data.vocab_size=8", "data.valid_size=16",
       "model.length=6", "model.hidden_size=32", "model.n_heads=2", "model.n_blocks=1",
       "model.cond_dim=16", "loader.global_batch_size=8", "sampling.print_samples=0"]


def flm_module(overrides=()):
    config = resolve_config(compose_config([*FLM, *overrides]))
    tokenizer = data.get_tokenizer(config)
    module = algo.FLM(config, len(tokenizer), tokenizer)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval(), config


def _draw(module, steps=6):
    return module.generate(6, steps, torch.Generator().manual_seed(1), torch.float64)


def test_hybrid_band_zero_one_is_the_network_sampler_and_one_one_the_exact_one():
    module, config = flm_module()
    exact = ExactDenoiser.from_data_config(config.data)
    network_samples = _draw(module)
    with swapped_prediction_network(module, lambda n: HybridNetwork(n, exact, (0.0, 1.0))):
        assert torch.equal(_draw(module), network_samples)
    with swapped_prediction_network(module, lambda n: HybridNetwork(n, exact, (1.0, 1.0))):
        hybrid_exact = _draw(module)
    assert torch.equal(hybrid_exact, OracleSampler(config).generate(
        6, 6, torch.Generator().manual_seed(1), torch.float64))
    assert not torch.equal(hybrid_exact, network_samples)


def test_hybrid_routes_each_call_by_its_time():
    module, config = flm_module()
    exact = ExactDenoiser.from_data_config(config.data)
    hybrid = HybridNetwork(module.backbone, exact, (0.25, 0.5))
    z = torch.randn(2, 6, 8, dtype=torch.float64)
    for time, route in ((0.2, "oracle"), (0.25, "network"), (0.4, "network"), (0.5, "oracle")):
        t = torch.full((2,), time)
        hidden, (got, c) = hybrid.features(z, t)
        assert got == route
        want = (exact.log_posterior(z, t) if route == "oracle"
                else module.backbone.logits_from_state(z.float(), t))
        torch.testing.assert_close(hybrid.head(hidden, (got, c)).to(want.dtype), want)


def test_diagnose_end_to_end_on_the_module_and_bad_settings():
    module, config = flm_module(["eval.diagnose=true", "eval.diagnose_samples=3",
                                 "sampling.batch_size=2"])
    diagnose = diagnostics.setup_from_config(config, module)
    out = diagnose(5)  # grid times 0, .2, .4, .6, .8: bins 0, 2, 4, 6, 8
    for key in ("trajectory_kl", "data_kl"):
        assert [v is not None for v in out[key]] == [k % 2 == 0 for k in range(10)]
        assert all(v >= 0 for v in out[key] if v is not None)
    for bad, key in ((["eval.denoiser=hybrid", "eval.hybrid_band=[0.6,0.2]"], "hybrid_band"),
                     (["eval.denoiser=hybrid", "algo=mdlm"], "algo=mdlm"),
                     (["eval.diagnose=true", "eval.denoiser=oracle"], "eval.denoiser=oracle")):
        with pytest.raises(ConfigError, match=key):
            diagnostics.check_config(compose_config([*FLM, *bad]))
    with pytest.raises(ConfigError, match="data=synthetic"):
        diagnostics.check_config(compose_config(["algo=flm", "data=embedded",
                                                 "eval.diagnose=true"]))
