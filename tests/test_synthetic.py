"""Tests of the exact-likelihood synthetic source and its oracle judge.

Every numerical claim is checked against an independent computation: brute-force
enumeration (itertools, numpy forward pass in probability space, sum over hidden paths),
a closed form, or a Monte Carlo estimate with a tolerance of MC_SIGMAS standard errors.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats
from torch.utils.data import DataLoader

from data.synthetic import (
    SyntheticSequences,
    SyntheticSource,
    SyntheticTokenizer,
    make_datasets,
    make_tokenizer,
)
from evaluation.oracle import OracleJudge, build_oracle_judge, oracle_report

MC_SIGMAS = 4.0  # Monte Carlo tolerance in standard errors (two-sided p ~ 6e-5)
CHI2_MIN_P_VALUE = 1e-4  # smallest accepted p-value of a goodness-of-fit test
EXACT_TOL = 1e-10  # float64 agreement of two exact computations
CONFIG_DIR = "configs/data"


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The sequential forward pass runs on tiny tensors: intra-op threads only thrash on a
    loaded 2-core machine (25 s instead of 0.4 s seen), so this module runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_markov(**overrides) -> SyntheticSource:
    kwargs = dict(source_kind="markov", vocab_size=4, num_successors=2, dirichlet_alpha=1.0,
                  initial_distribution="stationary", source_seed=3)
    kwargs.update(overrides)
    return SyntheticSource(**kwargs)


def tiny_hmm(**overrides) -> SyntheticSource:
    kwargs = dict(source_kind="hmm", vocab_size=3, num_hidden=3, num_successors=2,
                  num_emissions=2, dirichlet_alpha=1.0, initial_distribution="stationary",
                  source_seed=5)
    kwargs.update(overrides)
    return SyntheticSource(**kwargs)


def every_sequence(vocab_size: int, length: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=length)))


def brute_force_prob(source: SyntheticSource, sequence: tuple[int, ...]) -> float:
    """p(x) as a plain loop (markov) or a sum over all hidden paths (hmm)."""
    init, trans = source.initial_np, source.transition_np
    if source.source_kind == "markov":
        p = init[sequence[0]]
        for a, b in itertools.pairwise(sequence):
            p *= trans[a, b]
        return p
    emit = source.emission_np
    total = 0.0
    for path in itertools.product(range(source.num_states), repeat=len(sequence)):
        p = init[path[0]] * emit[path[0], sequence[0]]
        for t in range(1, len(sequence)):
            p *= trans[path[t - 1], path[t]] * emit[path[t], sequence[t]]
        total += p
    return total


def hmm_probs_given_start(source: SyntheticSource, length: int, start: np.ndarray) -> np.ndarray:
    """p(x) for all V**length sequences from a hidden start law: numpy forward pass in
    probability space (a second code path to the log-space forward algorithm)."""
    seqs = every_sequence(source.vocab_size, length).numpy()
    alpha = start[None, :] * source.emission_np[:, seqs[:, 0]].T
    for t in range(1, length):
        alpha = (alpha @ source.transition_np) * source.emission_np[:, seqs[:, t]].T
    return alpha.sum(1)


def entropy_of(probs: np.ndarray) -> float:
    probs = probs[probs > 0]
    return float(-(probs * np.log(probs)).sum())


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "source",
    [
        tiny_markov(),
        tiny_markov(initial_distribution="random", num_successors=None),
        tiny_markov(vocab_size=3, num_successors=1, initial_distribution="uniform"),
        tiny_hmm(),
        tiny_hmm(vocab_size=4, num_emissions=None, initial_distribution="random"),
    ],
    ids=["markov-sparse", "markov-full-random-init", "markov-cycle", "hmm-sparse", "hmm-full"],
)
def test_log_prob_is_a_normalised_exact_distribution(source):
    for length in (1, 3, 4):
        seqs = every_sequence(source.vocab_size, length)
        log_p = source.log_prob(seqs)
        assert math.isclose(float(log_p.exp().sum()), 1.0, abs_tol=EXACT_TOL)
        assert not torch.isnan(log_p).any()
    brute = torch.tensor([brute_force_prob(source, tuple(s)) for s in seqs.tolist()])
    torch.testing.assert_close(log_p.exp(), brute.double(), atol=EXACT_TOL, rtol=0)
    assert bool(torch.isneginf(log_p[brute == 0]).all())  # impossible -> exactly -inf


def test_prefix_log_probs_are_log_probs_of_prefixes():
    source = tiny_hmm(vocab_size=4, num_emissions=3)
    tokens = source.sample(64, 7, torch.Generator().manual_seed(0))
    prefix = source.prefix_log_probs(tokens)
    for t in (1, 4, 7):
        torch.testing.assert_close(prefix[:, t - 1], source.log_prob(tokens[:, :t]))


def test_out_of_range_ids_are_impossible_not_errors():
    source = tiny_hmm()
    tokens = torch.tensor([[0, 1, 2], [0, 3, 1], [-1, 0, 0]])
    log_p = source.log_prob(tokens)
    expected = brute_force_prob(source, (0, 1, 2))
    assert math.isclose(float(log_p[0].exp()), expected, abs_tol=EXACT_TOL)
    assert bool(torch.isneginf(log_p[1:]).all())


@pytest.mark.parametrize("initial", ["stationary", "random", "uniform"])
def test_markov_sequence_entropy_matches_enumeration(initial):
    source = tiny_markov(vocab_size=4, num_successors=3, initial_distribution=initial)
    for length in (1, 2, 5):
        probs = source.log_prob(every_sequence(4, length)).exp().numpy()
        assert math.isclose(source.sequence_entropy(length), entropy_of(probs), abs_tol=EXACT_TOL)


def test_markov_stationary_sequence_entropy_formula():
    """For a stationary start, H(X_1..X_L) = H(pi) + (L-1) * entropy_rate."""
    source = SyntheticSource(vocab_size=32, num_successors=5, source_seed=1)
    pi = source.stationary_np
    np.testing.assert_allclose(pi @ source.transition_np, pi, atol=1e-12)
    for length in (1, 16, 100):
        expected = entropy_of(pi) + (length - 1) * source.entropy_rate()
        assert math.isclose(source.sequence_entropy(length), expected, rel_tol=1e-12)


def test_markov_entropy_rate_is_the_limit_of_sequence_entropy_increments():
    """From a non-stationary start, H(X_1..X_2n) - H(X_1..X_n) -> n * entropy_rate."""
    source = SyntheticSource(vocab_size=16, num_successors=3, initial_distribution="random",
                             source_seed=4)
    assert np.abs(source.initial_np - source.stationary_np).max() > 0.01
    n = 1000
    increment = (source.sequence_entropy(2 * n) - source.sequence_entropy(n)) / n
    assert math.isclose(increment, source.entropy_rate(), abs_tol=1e-9)


def test_extreme_uniforms_never_draw_impossible_tokens():
    """Inverse-CDF edges: u = 0 and the largest u < 1 still give possible sequences."""
    for source in (tiny_markov(vocab_size=8, num_successors=2), tiny_hmm(vocab_size=8)):
        for value in (0.0, 1.0 - 2.0**-53):
            tokens = source.tokens_from_uniforms(torch.full((1, 6, 2), value, dtype=torch.float64))
            assert math.isfinite(float(source.log_prob(tokens)[0]))


def test_uniform_full_support_source_has_entropy_log_v():
    vocab = 16
    source = SyntheticSource(vocab_size=vocab, num_successors=None, dirichlet_alpha=None,
                             initial_distribution="uniform")
    assert math.isclose(source.entropy_rate(), math.log(vocab), rel_tol=1e-12)
    assert math.isclose(source.sequence_entropy(12) / 12, math.log(vocab), rel_tol=1e-12)
    uniform = torch.randint(0, vocab, (50, 12), generator=torch.Generator().manual_seed(0))
    report = OracleJudge(source).report(uniform)
    assert math.isclose(report["oracle_nll_per_token"], math.log(vocab), rel_tol=1e-12)
    assert math.isclose(report["oracle_gen_ppl"], vocab, rel_tol=1e-10)
    assert abs(report["entropy_gap"]) < 1e-12


# ----------------------------------------------------------------------------- Monte Carlo


def test_markov_entropy_rate_matches_monte_carlo():
    """E[-log p(X_1..X_L) + log p(X_1)] / (L-1) = entropy rate for a stationary chain."""
    source = SyntheticSource(vocab_size=48, num_successors=6, dirichlet_alpha=0.7, source_seed=2)
    length = 64
    tokens = source.sample(4000, length, torch.Generator().manual_seed(1))
    per_seq = -(source.log_prob(tokens) - source.log_prob(tokens[:, :1])) / (length - 1)
    stderr = float(per_seq.std()) / math.sqrt(len(per_seq))
    assert abs(float(per_seq.mean()) - source.entropy_rate()) < MC_SIGMAS * stderr


@pytest.mark.parametrize("kind", ["markov", "hmm"])
def test_source_samples_score_the_source_entropy(kind):
    """Samples from the source have oracle NLL/token = H(X_1..X_L)/L up to MC error."""
    if kind == "markov":
        source = SyntheticSource(vocab_size=64, num_successors=4, initial_distribution="random")
        length = 128
    else:  # V**L = 4**7 sequences: the entropy is exact by enumeration
        source = tiny_hmm(vocab_size=4, num_hidden=5, num_emissions=3)
        length = 7
        assert source.entropy_is_exact(length)
    tokens = source.sample(3000, length, torch.Generator().manual_seed(2))
    judge = OracleJudge(source)
    nll_sum, n_tokens = judge.score(tokens, ["ignored"] * len(tokens))
    assert bool((n_tokens == length).all())
    report = oracle_report(nll_sum, n_tokens, source, length)
    stderr = float((nll_sum / length).std()) / math.sqrt(len(nll_sum))
    assert report["oracle_impossible_fraction"] == 0.0
    assert abs(report["entropy_gap"]) < MC_SIGMAS * stderr


def test_hmm_monte_carlo_sequence_entropy_matches_enumeration():
    source = tiny_hmm(vocab_size=4, num_hidden=4, num_emissions=3, source_seed=11)
    length = 6
    exact = entropy_of(hmm_probs_given_start(source, length, source.initial_np))
    assert math.isclose(source.enumerated_sequence_entropy(length), exact, abs_tol=EXACT_TOL)
    estimate, stderr = source.monte_carlo_sequence_entropy(length, 4000, seed=0)
    assert abs(estimate - exact) < MC_SIGMAS * stderr


def test_hmm_entropy_rate_estimate_lies_between_exact_bounds():
    """H(X_L | X_<L, S_1) <= rate <= H(X_L | X_<L) (Cover & Thomas Thm 4.5.1), both exact by
    enumeration for a stationary HMM."""
    source = tiny_hmm(vocab_size=3, num_hidden=3, num_successors=3, num_emissions=3,
                      dirichlet_alpha=2.0, source_seed=4)
    length = 8  # the two bounds agree to ~1e-6 here, far below the MC error
    pi = source.initial_np

    def joint_entropy(n):
        return entropy_of(hmm_probs_given_start(source, n, pi))

    def conditional_on_start(n):
        return sum(pi[s] * entropy_of(hmm_probs_given_start(source, n, np.eye(3)[s]))
                   for s in range(3))

    upper = joint_entropy(length) - joint_entropy(length - 1)
    lower = conditional_on_start(length) - conditional_on_start(length - 1)
    assert lower <= upper
    estimate, stderr = source.entropy_rate_estimate()
    assert lower - MC_SIGMAS * stderr < estimate < upper + MC_SIGMAS * stderr
    assert source.entropy_rate() == estimate


def test_hmm_entropy_rate_estimate_on_a_relabelled_markov_chain():
    """An HMM whose hidden states emit distinct single tokens is a Markov chain: its entropy
    rate is the hidden chain's, -sum_i pi_i sum_j P_ij log P_ij, exactly."""
    source = SyntheticSource(source_kind="hmm", vocab_size=64, num_hidden=8, num_successors=3,
                             num_emissions=1, dirichlet_alpha=1.0, source_seed=0)
    emitted = np.nonzero(source.emission_np)[1]
    assert len(set(emitted.tolist())) == 8
    trans = source.transition_np
    row_entropy = -(trans * np.log(np.where(trans > 0, trans, 1.0))).sum(1)
    exact = float(source.stationary_np @ row_entropy)
    estimate, stderr = source.entropy_rate_estimate()
    assert abs(estimate - exact) < MC_SIGMAS * stderr


def test_uniform_tokens_score_the_closed_form_cross_entropy():
    """Full-support Dirichlet chain: E_uniform[-log p(X)] / L in closed form."""
    vocab, length = 12, 10
    source = SyntheticSource(vocab_size=vocab, num_successors=None, dirichlet_alpha=1.0,
                             initial_distribution="random", source_seed=6)
    expected = (-np.log(source.initial_np).mean()
                - (length - 1) * np.log(source.transition_np).mean()) / length
    uniform = torch.randint(0, vocab, (20000, length), generator=torch.Generator().manual_seed(3))
    nll_sum, n_tokens = OracleJudge(source).score(uniform, [])
    per_seq = nll_sum / n_tokens
    stderr = float(per_seq.std()) / math.sqrt(len(per_seq))
    report = oracle_report(nll_sum, n_tokens, source, length)
    assert abs(report["oracle_nll_per_token"] - expected) < MC_SIGMAS * stderr


def test_uniform_tokens_on_a_sparse_chain_report_inf():
    source = SyntheticSource(vocab_size=64, num_successors=4)
    uniform = torch.randint(0, 64, (100, 32), generator=torch.Generator().manual_seed(4))
    samples = source.sample(100, 32, torch.Generator().manual_seed(5))
    mixed = torch.cat([uniform, samples])
    report = OracleJudge(source).report(mixed)
    assert report["oracle_nll_per_token"] == math.inf
    assert report["oracle_gen_ppl"] == math.inf
    assert report["entropy_gap"] == math.inf
    assert report["oracle_impossible_fraction"] == 0.5  # uniform 32-token paths: all impossible
    possible = -source.log_prob(samples).sum() / samples.numel()
    assert math.isclose(report["oracle_nll_per_token_possible"], float(possible), rel_tol=1e-12)


# ----------------------------------------------------------------------------- sampler law


def transition_chi_square(source: SyntheticSource, tokens: torch.Tensor) -> float:
    """p-value of the chi-square test of sampled transitions against P (Anderson-Goodman);
    also checks that no transition outside the support occurs."""
    vocab = source.vocab_size
    pairs = tokens[:, :-1].reshape(-1) * vocab + tokens[:, 1:].reshape(-1)
    counts = torch.bincount(pairs, minlength=vocab * vocab).reshape(vocab, vocab).double()
    trans = torch.from_numpy(source.transition_np)
    assert float(counts[trans == 0].sum()) == 0.0
    visits = counts.sum(1, keepdim=True)
    expected = visits * trans
    cells = expected > 0
    statistic = float(((counts - expected)[cells] ** 2 / expected[cells]).sum())
    dof = int(((trans > 0).sum(1) - 1)[visits[:, 0] > 0].sum())
    return float(stats.chi2.sf(statistic, dof))


def test_sampled_transitions_match_the_chain():
    source = SyntheticSource(vocab_size=32, num_successors=4, dirichlet_alpha=0.5,
                             initial_distribution="random", source_seed=8)
    tokens = source.sample(2000, 40, torch.Generator().manual_seed(6))
    assert transition_chi_square(source, tokens) > CHI2_MIN_P_VALUE
    first = torch.bincount(tokens[:, 0], minlength=32).numpy()
    expected = len(tokens) * source.initial_np
    assert stats.chisquare(first, expected).pvalue > CHI2_MIN_P_VALUE
    # the dataset path (counter-based uniforms) draws from the same law
    dataset = SyntheticSequences(source, 40, 2000, data_seed=9, split="train")
    assert transition_chi_square(source, dataset.sequences(range(2000))) > CHI2_MIN_P_VALUE


def test_a_wrong_chain_fails_the_transition_test():
    """The goodness-of-fit test has power: samples of another chain are rejected."""
    source = SyntheticSource(vocab_size=32, num_successors=32, source_seed=8)
    other = SyntheticSource(vocab_size=32, num_successors=32, source_seed=9)
    tokens = other.sample(2000, 40, torch.Generator().manual_seed(6))
    assert transition_chi_square(source, tokens) < CHI2_MIN_P_VALUE


def test_hmm_sampled_sequences_match_log_prob():
    source = tiny_hmm(vocab_size=4, num_hidden=4, num_emissions=3)
    length, n = 3, 20000
    tokens = source.sample(n, length, torch.Generator().manual_seed(7))
    codes = (tokens * torch.tensor([16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=64).double()
    probs = source.log_prob(every_sequence(4, length)).exp()
    assert float(counts[probs == 0].sum()) == 0.0
    keep = probs > 0
    pvalue = stats.chisquare(counts[keep].numpy(), (n * probs[keep]).numpy()).pvalue
    assert pvalue > CHI2_MIN_P_VALUE


# ----------------------------------------------------------------------------- data hooks


def load_cfg(name: str):
    cfg = OmegaConf.load(f"{CONFIG_DIR}/{name}.yaml")
    if "defaults" in cfg:  # synthetic-hmm.yaml extends synthetic.yaml (Hydra defaults list)
        base = OmegaConf.load(f"{CONFIG_DIR}/synthetic.yaml")
        cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "defaults"})
    return cfg


@pytest.mark.parametrize("config", ["synthetic", "synthetic-hmm"])
def test_datasets_are_deterministic_per_index(config):
    cfg = load_cfg(config)
    cfg.valid_size = 64
    cfg.entropy_mc_samples = 256  # make_datasets logs the source entropy; keep it cheap
    train, valid = make_datasets(cfg, 24)
    train_again, _ = make_datasets(cfg, 24)
    assert len(train) == cfg.train_size and len(valid) == 64
    item = train[17]
    assert item["input_ids"].shape == (24,) and item["input_ids"].dtype == torch.long
    assert bool((item["attention_mask"] == 1).all())
    batch = train_again.__getitems__([3, 17, 999_999])
    assert torch.equal(batch[1]["input_ids"], item["input_ids"])
    assert torch.equal(batch[0]["input_ids"], train[3]["input_ids"])
    assert not torch.equal(train[3]["input_ids"], train[4]["input_ids"])
    assert not torch.equal(train.sequences(range(8)), valid.sequences(range(8)))
    cfg.data_seed = cfg.data_seed + 1
    reseeded, _ = make_datasets(cfg, 24)
    assert not torch.equal(reseeded.sequences(range(8)), train.sequences(range(8)))
    with pytest.raises(IndexError):
        train[len(train)]
    loader = DataLoader(valid, batch_size=16, num_workers=0)
    first = next(iter(loader))
    assert first["input_ids"].shape == (16, 24)
    assert torch.equal(first["input_ids"], valid.sequences(range(16)))


def test_source_parameters_depend_only_on_source_seed():
    a, b = tiny_hmm(source_seed=1), tiny_hmm(source_seed=1)
    c = tiny_hmm(source_seed=2)
    assert np.array_equal(a.emission_np, b.emission_np)
    assert np.array_equal(a.transition_np, b.transition_np)
    assert not np.array_equal(a.emission_np, c.emission_np)


def test_unbounded_train_size_and_config_checks():
    cfg = load_cfg("synthetic")
    cfg.train_size = None
    train, _ = make_datasets(cfg, 16)
    assert len(train) == 2**31 - 1
    assert train[2**31 - 2]["input_ids"].shape == (16,)
    for key, value in (("wrap", True), ("tokenizer_name_or_path", "gpt2")):
        bad = cfg.copy()
        bad[key] = value
        with pytest.raises(ValueError, match=key):
            make_datasets(bad, 16)
    wrong = cfg.copy()
    wrong.name = "lm1b"
    with pytest.raises(ValueError, match="data=synthetic"):
        build_oracle_judge(wrong)


def test_tokenizer_round_trip_and_oracle_factory():
    cfg = load_cfg("synthetic")
    tokenizer = make_tokenizer(cfg)
    assert isinstance(tokenizer, SyntheticTokenizer)
    assert len(tokenizer) == tokenizer.vocab_size == cfg.vocab_size
    assert tokenizer.bos_token_id is None and tokenizer.pad_token_id is None
    ids = torch.tensor([[12, 5, 0], [63, 63, 1]])
    texts = tokenizer.batch_decode(ids)
    assert texts[0] == "t12 t5 t0"
    assert [tokenizer.encode(t) for t in texts] == ids.tolist()
    judge = build_oracle_judge(cfg)
    assert judge.name == "oracle"
    tokens = judge.source.sample(8, 16, torch.Generator().manual_seed(0))
    nll_sum, _ = judge.score(tokens, tokenizer.batch_decode(tokens))
    torch.testing.assert_close(nll_sum, -SyntheticSource.from_config(cfg).log_prob(tokens))


# ----------------------------------------------------------------------------- sparse form


def test_sparse_rows_agree_with_an_independent_dense_computation(monkeypatch):
    """Sampling, log_prob, entropies and the stationary law read the (S, k) rows; check
    them against dense numpy built from those rows by a plain loop (eigenvector pi,
    per-sequence products, law @ P), on a sparse and a dense-row chain."""
    for source in (tiny_markov(vocab_size=7, num_successors=3, source_seed=11),
                   tiny_markov(vocab_size=5, num_successors=None, source_seed=12)):
        s, k = source.successors.shape
        dense = np.zeros((s, s))
        for i in range(s):
            for j in range(k):
                dense[i, source.successors[i, j]] += source.successor_probs[i, j]
        np.testing.assert_allclose(dense.sum(1), 1.0, atol=EXACT_TOL)
        np.testing.assert_array_equal(source.transition_np, dense)
        values, vectors = np.linalg.eig(dense.T)
        pi = np.real(vectors[:, np.argmin(np.abs(values - 1))])
        pi /= pi.sum()
        np.testing.assert_allclose(source.stationary_np, pi, atol=1e-10)
        seqs = every_sequence(s, 3)
        expected = np.array([source.initial_np[a] * dense[a, b] * dense[b, c]
                             for a, b, c in seqs.tolist()])
        got = source.log_prob(seqs).exp().numpy()
        np.testing.assert_allclose(got, expected, atol=EXACT_TOL)
        row_h = -np.where(dense > 0, dense * np.log(np.where(dense > 0, dense, 1)), 0).sum(1)
        assert source.entropy_rate() == pytest.approx(pi @ row_h, rel=1e-10)
        law, value = source.initial_np.copy(), entropy_of(source.initial_np)
        for _ in range(5):
            value += law @ row_h
            law = law @ dense
        assert source.sequence_entropy(6) == pytest.approx(value, rel=1e-10)
    # the power-iteration path (used beyond DENSE_SOLVE_LIMIT states) gives the same pi
    from data import synthetic

    monkeypatch.setattr(synthetic, "DENSE_SOLVE_LIMIT", 2)
    iterated = tiny_markov(vocab_size=7, num_successors=3, source_seed=11)
    monkeypatch.undo()
    solved = tiny_markov(vocab_size=7, num_successors=3, source_seed=11)
    np.testing.assert_allclose(iterated.stationary_np, solved.stationary_np, atol=1e-9)


def test_gpt2_sized_source_sets_up_without_a_dense_matrix():
    """V = 50258 (GPT-2's vocabulary + 1): every array the source keeps is O(V k) at most,
    and it samples, scores and reports entropies from that form."""
    vocab = 50258
    source = SyntheticSource(vocab_size=vocab, num_successors=4, source_seed=0)
    arrays = {name: value for name, value in vars(source).items()
              if isinstance(value, (np.ndarray, torch.Tensor))}
    assert arrays, "the source keeps its parameters as arrays"
    for name, value in arrays.items():
        assert np.prod(value.shape) <= 4 * vocab, (name, tuple(value.shape))
    tokens = source.sample(4, 32, torch.Generator().manual_seed(0))
    log_p = source.log_prob(tokens)
    # independent: sum of log P[a, b] looked up row by row in the sparse form
    for row, value in zip(tokens.tolist(), log_p.tolist()):
        expected = math.log(source.initial_np[row[0]])
        for a, b in zip(row[:-1], row[1:]):
            hit = np.nonzero(source.successors[a] == b)[0]
            assert hit.size == 1
            expected += math.log(source.successor_probs[a, hit[0]])
        assert value == pytest.approx(expected, rel=1e-12)
    pi = source.stationary_np
    step = np.bincount(source.successors.ravel(), (pi[:, None] * source.successor_probs).ravel(),
                       minlength=vocab)
    assert np.abs(step - pi).max() < 1e-9
    assert 0 < source.entropy_rate() < math.log(4)


def test_near_impossible_fraction_counts_transitions_below_the_threshold():
    from evaluation.oracle import NEAR_IMPOSSIBLE_PROBABILITY, near_impossible_fraction

    source = tiny_markov(vocab_size=6, num_successors=None, dirichlet_alpha=0.1, source_seed=4)
    dense = source.transition_np
    tokens = torch.randint(0, 6, (50, 9), generator=torch.Generator().manual_seed(1))
    low = [dense[a, b] < NEAR_IMPOSSIBLE_PROBABILITY for row in tokens.tolist()
           for a, b in zip(row[:-1], row[1:])]
    assert 0 < sum(low) < len(low)  # the check below can fail both ways
    assert near_impossible_fraction(source, tokens) == pytest.approx(np.mean(low), abs=1e-12)
    report = OracleJudge(source).report(tokens)
    assert report["oracle_near_impossible_fraction"] == pytest.approx(np.mean(low), abs=1e-12)
