"""eval.temperatures: the temperature wrapper on every algorithm's sampler, the frontier
interpolation against a hand-computed case, and the paper protocol's numbers unchanged."""

from __future__ import annotations

import json
import math

import pytest
import torch

import algo
import data
from algo import resolve_config
from evaluation import metrics
from evaluation.frontier import frontier_summary, interpolate_at_entropy
from evaluation.network_wrappers import (
    TemperatureNetwork,
    prediction_network_slot,
    swapped_prediction_network,
)
from evaluation.sample_eval import check_temperatures, run_sample_eval
from flow.sampling import initial_state
from runtime.config import ConfigError
from tests.helpers import compose_config
from tests.oracles import sample_euler_reference

TINY = ["data=synthetic", "data.vocab_size=8", "data.valid_size=16", "model.length=6",
        "model.hidden_size=32", "model.n_heads=2", "model.n_blocks=1", "model.cond_dim=16",
        "loader.global_batch_size=8", "sampling.print_samples=0"]
ALGOS = {"flm": [], "mdlm": [], "ar": ["algo.first_token=start"],
         "flm_distill": ["algo.teacher_path=oracle"],
         "flm_distill_second": ["mode=sample_eval"]}


def tiny_module(name: str):
    config = resolve_config(compose_config([f"algo={name}", *TINY, *ALGOS[name]]))
    tokenizer = data.get_tokenizer(config)
    module = algo.algorithm_class(name)(config, len(tokenizer), tokenizer)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights: a zero-initialised output layer samples uniformly
        for p in module.backbone.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def draw(module, steps=5, seed=3):
    return module.generate(num_samples=4, steps=steps,
                           generator=torch.Generator().manual_seed(seed),
                           state_dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(ALGOS))
def test_temperature_one_reproduces_the_samples_and_other_temperatures_change_them(name):
    module = tiny_module(name)
    steps = 6 if name == "ar" else 5  # AR: one call per token
    plain = draw(module, steps)
    container, key = prediction_network_slot(module)
    network = container[key]
    with swapped_prediction_network(module, lambda net: TemperatureNetwork(net, 1.0)) as w:
        assert container[key] is w and w.network is network
        at_one = draw(module, steps)
    assert container[key] is network  # put back
    torch.testing.assert_close(at_one, plain, rtol=0, atol=0)
    with swapped_prediction_network(module, lambda net: TemperatureNetwork(net, 0.05)):
        cold = draw(module, steps)
    assert not torch.equal(cold, plain)


def test_flm_at_temperature_matches_the_reference_sampler_on_tempered_logits():
    """Second code path: the V-space reference Euler sampler fed logits / T (V <= D, so the
    D-space sampler's initial draw is the same z)."""
    module = tiny_module("flm")
    net, temperature, steps = module.backbone, 0.6, 5
    with swapped_prediction_network(module, lambda n: TemperatureNetwork(n, temperature)):
        got = draw(module, steps)
    eye = torch.eye(net.input_embedding.shape[0], dtype=torch.float64)
    identity = type("Identity", (), {"input_embedding": eye})()
    noise = initial_state(identity, 4, 6, torch.Generator().manual_seed(3), dtype=torch.float64)
    want = sample_euler_reference(
        lambda z, t, t2: net.logits_from_state(z.float(), t).double() / temperature,
        module.table, noise, steps, module.config.sampling.denominator_eps)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_temperature_divides_the_head_logits():
    module = tiny_module("mdlm")
    net = module.backbone
    h = torch.randn(2, 6, net.input_embedding.shape[1])
    t = torch.full((2,), 0.4)
    wrapped = TemperatureNetwork(net, 2.5)
    hidden, c = wrapped.features(h, t)
    torch.testing.assert_close(wrapped.head(hidden, c), net.head(*net.features(h, t)) / 2.5)
    torch.testing.assert_close(wrapped(h, t), net(h, t) / 2.5)
    assert hasattr(wrapped, "padded_embedding") == hasattr(net, "padded_embedding")


def test_bad_temperatures_are_config_errors():
    for bad in ([], [0.0], [1.0, 1.0], [-1]):
        with pytest.raises(ConfigError, match="eval.temperatures"):
            check_temperatures(bad)
    assert check_temperatures([0.5, 1]) == [0.5, 1.0]


# ---- frontier ----------------------------------------------------------------------------
def _rows():
    # T, entropy, gen PPL for one step count, given out of order
    return [{"temperature": 1.5, "steps": 8, "entropy_mean": 4.0, "gen_ppl": 50.0},
            {"temperature": 0.5, "steps": 8, "entropy_mean": 2.0, "gen_ppl": 10.0},
            {"temperature": 1.0, "steps": 8, "entropy_mean": 3.0, "gen_ppl": 20.0}]


def test_interpolation_at_the_reference_entropy_by_hand():
    frontier, at = frontier_summary(_rows(), {"entropy_mean": 3.5})
    assert [p["temperature"] for p in frontier["8"]] == [0.5, 1.0, 1.5]  # sorted by entropy
    # 3.5 lies between (3.0, 20) and (4.0, 50): 20 + (3.5 - 3.0) / (4.0 - 3.0) * (50 - 20) = 35
    assert at["8"] == {"value": pytest.approx(35.0), "reason": None}
    # 2.25 between (2.0, 10) and (3.0, 20): 10 + 0.25 * 10 = 12.5
    assert interpolate_at_entropy(frontier["8"], 2.25)["value"] == pytest.approx(12.5)
    assert interpolate_at_entropy(frontier["8"], 3.0)["value"] == 20.0  # on a row


def test_interpolation_outside_the_range_or_without_reference_is_null_with_reason():
    points = frontier_summary(_rows(), None)[0]["8"]
    for entropy in (1.9, 4.1):
        out = interpolate_at_entropy(points, entropy)
        assert out["value"] is None and "outside" in out["reason"]
    assert frontier_summary(_rows(), None)[1]["8"]["value"] is None
    assert "reference" in frontier_summary(_rows(), None)[1]["8"]["reason"]
    inf_rows = [{**r, "gen_ppl": math.inf} for r in _rows()]
    assert interpolate_at_entropy(frontier_summary(inf_rows, None)[0]["8"], 3.0)["value"] is None


# ---- run_sample_eval: temperature rows, and the paper protocol unchanged ------------------
class CountJudge:
    """A judge with a fixed rule: token v costs (v + 1) / 10 nats; every token is scored."""

    name = "count"

    def score(self, ids, texts):
        return ((ids.double() + 1) / 10).sum(1), torch.full((len(ids),), ids.shape[1])


def _fake_sample_fn(temperature=1.0):
    def sample_fn(steps, n, seed):
        g = torch.Generator().manual_seed(seed + steps)
        vocab = max(2, int(3 * temperature * steps))  # hotter, more steps: more distinct ids
        return torch.randint(vocab, (n, 10), generator=g)
    return sample_fn


def _run(tmp_path, protocol, **kw):
    reference = _fake_sample_fn(2.0)(4, 12, 7)
    return run_sample_eval(
        _fake_sample_fn(), lambda ids: [str(r) for r in ids.tolist()], CountJudge(),
        reference_texts=[str(r) for r in reference.tolist()], reference_ids=reference,
        steps_list=[1, 4], num_samples=12, seed=0, out_dir=str(tmp_path), model_name="fake",
        network_calls_per_step=1, compute_mauve=False, warmup=False, protocol=protocol, **kw)


def test_paper_protocol_numbers_come_straight_from_the_samples(tmp_path):
    """Default temperatures: the untempered sample_fn only, and each paper-protocol number
    equal to its direct computation (float32 gen PPL, entropy over all ids)."""
    def never(temperature):
        raise AssertionError("the tempered sampler must not run at temperature 1")
    summary = _run(tmp_path, "paper", tempered_sample_fn=never)
    assert [(r["temperature"], r["steps"]) for r in summary["rows"]] == [(1.0, 1), (1.0, 4)]
    for row in summary["rows"]:
        ids = _fake_sample_fn()(row["steps"], 12, 0)
        nll, n = CountJudge().score(ids, None)
        want = float(torch.exp(nll.float().sum() / n.float().sum()))
        assert row["gen_ppl"] == want
        assert row["entropy_mean"] == pytest.approx(
            sum(metrics.unigram_entropy(r) for r in ids.tolist()) / 12, rel=1e-12)
        assert row["distinct_2"] == pytest.approx(
            sum(metrics.distinct_n(r, 2) for r in ids.tolist()) / 12, rel=1e-12)
    on_disk = json.loads((tmp_path / "samples.json").read_text())
    assert sorted(on_disk["steps"]) == ["1", "4"]  # records keyed by steps as before


def test_temperature_rows_frontier_and_plot(tmp_path):
    summary = _run(tmp_path, "clean", temperatures=[0.5, 1.0, 2.0],
                   tempered_sample_fn=_fake_sample_fn)
    assert len(summary["rows"]) == 6
    assert sorted(summary["frontier"]) == ["1", "4"]
    assert all(len(points) == 3 for points in summary["frontier"].values())
    for steps, out in summary["gen_ppl_at_reference_entropy"].items():
        points = summary["frontier"][steps]
        want = interpolate_at_entropy(points, summary["reference"]["entropy_mean"])
        assert out == want
    assert (tmp_path / "frontier_plot.png").stat().st_size > 0
    assert "self-BLEU" in summary["table"] and "rep-2" in summary["table"]
    row = summary["rows"][0]
    assert {"rep_2", "rep_3", "rep_4", "self_bleu"} <= set(row)
