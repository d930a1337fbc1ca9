"""The exact denoiser against brute-force enumeration of every sequence of tiny sources.

The reference posterior is written from scratch: p(x | z) ∝ p(x)·Π_i N(z_i; γ e(x_i),
(1 - γ)² I) with the full Gaussian density (no dropped constants) and p(x) from the
source's own ``log_prob``, marginalised per position by summing over all V**L sequences.
"""

import math

import numpy as np
import pytest
import torch

from data.synthetic import SyntheticSource, all_sequences
from flow.sampling import initial_state, sample_euler
from models.exact_denoiser import (
    ExactDenoiser,
    gap_metrics,
    gathered_logsumexp,
    inverse_index,
    observation_log_likelihood,
)
from tests.helpers import total_variation


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(kind: str, vocab: int, seed: int, **kw) -> SyntheticSource:
    if kind == "markov":
        return SyntheticSource("markov", vocab_size=vocab, num_successors=kw.get("k", 2),
                               dirichlet_alpha=0.7, initial_distribution="random",
                               source_seed=seed)
    return SyntheticSource("hmm", vocab_size=vocab, num_hidden=3, num_successors=2,
                           num_emissions=kw.get("m", 2), dirichlet_alpha=0.7,
                           initial_distribution="random", source_seed=seed)


def brute_force_marginals(source: SyntheticSource, z: torch.Tensor, gamma: torch.Tensor,
                          ) -> torch.Tensor:
    """(B, L, V) posterior marginals by enumeration with the full Gaussian density."""
    batch, length, vocab = z.shape
    seqs = all_sequences(vocab, length)  # (N, L)
    log_prior = source.log_prob(seqs)  # (N,)
    onehot = torch.nn.functional.one_hot(seqs, vocab).double()  # (N, L, V)
    out = torch.zeros(batch, length, vocab, dtype=torch.float64)
    for b in range(batch):
        g = float(gamma[b])
        sigma = 1.0 - g
        diff = z[b].double()[None] - g * onehot  # (N, L, V)
        log_lik = (-(diff ** 2).sum((1, 2)) / (2 * sigma ** 2)
                   - length * vocab * math.log(sigma * math.sqrt(2 * math.pi)))
        post = torch.softmax(log_prior + log_lik, dim=0)  # (N,)
        out[b] = torch.einsum("n,nlv->lv", post, onehot)
    return out


def flm_draw(source: SyntheticSource, batch: int, length: int, gamma: torch.Tensor,
             seed: int) -> torch.Tensor:
    """x_γ = (1 - γ)ε + γ e(x) for x drawn from the source (the FLM observation model)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = source.sample(batch, length, gen)
    eps = torch.randn(batch, length, source.vocab_size, generator=gen, dtype=torch.float64)
    g = gamma[:, None, None]
    return (1 - g) * eps + g * torch.nn.functional.one_hot(tokens, source.vocab_size).double()


@pytest.mark.parametrize("kind,vocab,length,seed", [("markov", 3, 3, 0), ("markov", 4, 4, 1),
                                                    ("hmm", 3, 3, 2), ("hmm", 4, 4, 3)])
def test_posterior_marginals_match_enumeration(kind, vocab, length, seed):
    source = tiny(kind, vocab, seed)
    oracle = ExactDenoiser(source)
    t = torch.tensor([0.0, 0.1, 0.35, 0.6, 0.85, 0.97], dtype=torch.float64)
    gamma = oracle.table.gamma_of_alpha(t)
    z = flm_draw(source, len(t), length, gamma, seed)
    got = oracle(z, t).exp()
    expected = brute_force_marginals(source, z, gamma)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # at t = 0 the observation says nothing: the marginals are the source's own
    prior = brute_force_marginals(source, torch.zeros(1, length, vocab), torch.zeros(1))
    torch.testing.assert_close(got[0], prior[0], rtol=1e-9, atol=1e-12)


def test_posterior_on_off_source_states_and_dense_chain_matches_enumeration():
    """Arbitrary states (as a sampler visits them, not x_γ of a source draw) and full rows."""
    source = tiny("markov", 4, 5, k=4)
    oracle = ExactDenoiser(source)
    gen = torch.Generator().manual_seed(5)
    z = 2.0 * torch.randn(4, 3, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.8, 0.95], dtype=torch.float64)
    expected = brute_force_marginals(source, z, oracle.table.gamma_of_alpha(t))
    torch.testing.assert_close(oracle(z, t).exp(), expected, rtol=1e-9, atol=1e-12)


def test_observation_log_likelihood_is_the_gaussian_up_to_a_constant_in_v():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    gamma = torch.tensor([0.3, 0.8], dtype=torch.float64)
    ell = observation_log_likelihood(z, gamma)
    sigma = (1 - gamma)[:, None, None, None]
    onehot = torch.eye(5, dtype=torch.float64)  # (v, V)
    full = -((z[:, :, None, :] - gamma[:, None, None, None] * onehot) ** 2).sum(-1) / (
        2 * sigma[..., 0] ** 2)  # (B, L, v)
    diff = ell - full
    torch.testing.assert_close(diff - diff[..., :1], torch.zeros_like(diff), atol=1e-9, rtol=0)


def test_gathered_logsumexp_matches_a_loop():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    values[0, 2] = -math.inf
    index = torch.tensor([0, 2, 2, 0, 4, 2, 0])
    got = gathered_logsumexp(values, inverse_index(index, 5))
    for c in range(5):
        sel = values[:, index == c]
        want = (torch.logsumexp(sel, -1) if sel.shape[1]
                else torch.full((3,), -math.inf, dtype=torch.float64))
        torch.testing.assert_close(got[:, c], want)


def test_euler_with_the_exact_denoiser_reaches_the_source():
    """All V**L sequences' frequencies after 128 Euler steps vs the source's law. The
    tolerance is 4x the expected TV of N exact samples of the source (Monte Carlo below)."""
    source = tiny("markov", 3, 6, k=2)
    oracle = ExactDenoiser(source)
    probs = source.log_prob(all_sequences(3, 3)).exp()
    n = 3000
    gen = torch.Generator().manual_seed(0)
    noise = initial_state(oracle, n, 3, gen, dtype=torch.float64)
    samples = sample_euler(oracle, oracle.table, noise, 128, 1e-5)
    tv = total_variation(samples, probs, 3)
    reference = np.mean([total_variation(source.sample(n, 3, torch.Generator().manual_seed(s)),
                                         probs, 3) for s in range(5)])
    assert tv < 4 * reference, (tv, reference)
    # and a denoiser that ignores the chain (a uniform source) is far off
    assert total_variation(torch.randint(0, 3, (n, 3), generator=gen), probs, 3) > 4 * reference


# ---- the training gap, the oracle teacher and eval.denoiser ---------------------------


class UniformNetwork(torch.nn.Module):
    """Constant logits: its cross-entropy is log V whatever the input."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def embed_state(self, z):
        return z

    def forward(self, h, t):
        return torch.zeros(*h.shape[:2], self.vocab)


def test_gap_is_zero_for_the_exact_denoiser_and_log_v_minus_bayes_for_a_uniform_one():
    source = tiny("markov", 4, 7, k=2)
    oracle = ExactDenoiser(source)
    tokens = source.sample(40, 4, torch.Generator().manual_seed(0))
    t = (torch.arange(40, dtype=torch.float64) + 0.5) / 40
    gamma = oracle.table.gamma_of_alpha(t)
    same = gap_metrics(oracle, oracle, tokens, t.float(), gamma, torch.Generator().manual_seed(1))
    assert abs(float(same["val/gap"][0])) < 1e-6  # float32 draw of x_γ, float64 posteriors
    assert {f"val/gap_bin{k}" for k in range(10)} <= set(same)
    assert sum(same[f"val/gap_bin{k}"][1] for k in range(10)) == 40
    uniform = gap_metrics(UniformNetwork(4), oracle, tokens, t.float(), gamma,
                          torch.Generator().manual_seed(1))
    bayes = float(uniform["val/ce_bayes"][0])
    assert float(uniform["val/ce_model"][0]) == pytest.approx(math.log(4), rel=1e-6)
    assert float(uniform["val/gap"][0]) == pytest.approx(math.log(4) - bayes, rel=1e-6)
    # Bayes CE falls from the prior marginal's entropy (t ~ 0) to ~0 (t ~ 1): the uniform
    # model's gap grows across the bins
    assert uniform["val/gap_bin0"][0] < uniform["val/gap_bin9"][0]


def synthetic_overrides(**extra) -> list[str]:
    base = {"data": "synthetic", "model.length": 4, "model.hidden_size": 32, "model.n_heads": 2,
            "model.n_blocks": 1, "model.cond_dim": 16, "data.vocab_size": 6,
            "data.valid_size": 16, "loader.global_batch_size": 8}
    base.update(extra)
    if base["data"] != "synthetic":
        base = {k: v for k, v in base.items() if not k.startswith("data.")}
    return [f"{k}={v}" for k, v in base.items()]


def test_oracle_teacher_drives_stage1_and_fmlm_losses_and_samplers():
    import algo
    from flow.registry import Teacher
    from runtime.config import resolve_config
    from tests.helpers import compose_config

    config = resolve_config(compose_config(synthetic_overrides(
        algo="flm_distill", **{"algo.teacher_path": "oracle"})))
    module = algo.FLMDistill(config, vocab_size=6)
    teacher = module.teacher("flm")
    assert isinstance(teacher, ExactDenoiser) and teacher.input_embedding.shape == (6, 6)
    tokens = SyntheticSource.from_config(config.data).sample(8, 4)
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    loss = module.compute_loss(batch, step=0, batch_idx=0)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in module.backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert not any(p.requires_grad for p in teacher.parameters())
    samples = module.generate(5, 3, torch.Generator().manual_seed(0))
    assert samples.shape == (5, 4) and int(samples.max()) < 6
    with pytest.raises(Exception, match="algo=flm_distill checkpoint"):
        module._load_teacher(Teacher("map", "teacher_path", "flm_distill"))


def test_eval_denoiser_choice_errors_name_the_key():
    from algo.oracle import check_denoiser_choice
    from runtime.config import ConfigError
    from tests.helpers import compose_config

    ok = compose_config(synthetic_overrides(**{"eval.denoiser": "oracle"}))
    check_denoiser_choice(ok)
    for overrides, match in (({"eval.denoiser": "exact"}, "eval.denoiser='exact'"),
                             ({"eval.denoiser": "oracle", "eval.checkpoint_path": "/x.ckpt"},
                              "eval.checkpoint_path"),
                             ({"eval.denoiser": "oracle", "data": "embedded"},
                              "needs data=synthetic")):
        with pytest.raises(ConfigError, match=match):
            check_denoiser_choice(compose_config(synthetic_overrides(**overrides)))
