"""Entropy, distinct-n and generative perplexity against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from evaluation import metrics


def test_unigram_entropy_closed_forms():
    # k equally frequent tokens: ln k
    for k in (1, 2, 5, 17):
        assert metrics.unigram_entropy(list(range(k)) * 3) == pytest.approx(math.log(k))
    # counts (2, 1, 1): -(1/2 ln 1/2 + 2 * 1/4 ln 1/4) = 1.5 ln 2
    assert metrics.unigram_entropy([7, 7, 3, 9]) == pytest.approx(1.5 * math.log(2))
    # order does not matter, repetition lowers it
    assert metrics.unigram_entropy([3, 9, 7, 7]) == metrics.unigram_entropy([7, 7, 3, 9])
    assert metrics.unigram_entropy([5] * 10) == 0.0


def test_distinct_counts_and_ratios():
    seq = [1, 2, 1, 2, 1]
    assert metrics.distinct_tokens(seq) == 2
    assert metrics.distinct_n(seq, 1) == pytest.approx(2 / 5)
    assert metrics.distinct_n(seq, 2) == pytest.approx(2 / 4)  # (1,2),(2,1) each twice
    assert metrics.distinct_n(seq, 3) == pytest.approx(2 / 3)  # (1,2,1),(2,1,2)
    assert metrics.distinct_n(seq, 4) == pytest.approx(2 / 2)
    assert metrics.distinct_n(list(range(9)), 3) == 1.0
    assert metrics.distinct_n([4, 4], 3) == 0.0  # no trigram
    rows = metrics.sample_metrics([seq, [3] * 4])
    assert rows[1]["distinct_2"] == pytest.approx(1 / 3)
    assert rows[1]["entropy"] == 0.0 and rows[0]["distinct_tokens"] == 2


def test_strip_special_drops_only_the_given_ids():
    ids = torch.tensor([[0, 5, 6, 1, 2, 2], [0, 2, 7, 7, 8, 1]])
    assert metrics.strip_special(ids, [0, 1, 2]) == [[5, 6], [7, 7, 8]]


def test_generative_perplexity_is_token_weighted():
    nll = torch.tensor([2.0, 6.0])
    n = torch.tensor([1, 3])
    # exp((2 + 6) / (1 + 3)) = e^2, not the mean of per-sample perplexities
    assert metrics.generative_perplexity(nll, n) == pytest.approx(math.exp(2.0))
    # per-sample NLL/token 1 and 3: pooled exp(10 / 4), not exp(mean(1, 3)) = e^2
    assert metrics.generative_perplexity(torch.tensor([1.0, 9.0]), n) == pytest.approx(
        math.exp(2.5))
    with pytest.raises(ValueError):
        metrics.generative_perplexity(torch.zeros(2), torch.zeros(2, dtype=torch.long))
