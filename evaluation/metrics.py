"""Sample-quality metrics that need no model: entropy, distinct-n, rep-n, generative perplexity.

Entropy and distinct-n are per sample, over the tokens the caller passes (the clean
protocol drops BOS/EOS/PAD, the paper protocol keeps all L ids); low entropy with low perplexity means repetitive text (docs/math.md §8).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from evaluation.diversity import REP_NS, rep_n

DISTINCT_NS = (1, 2, 3, 4)


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy (nats) of the empirical token distribution of one sample: -Σ p log p."""
    if len(tokens) == 0:
        return 0.0
    counts = torch.tensor(list(Counter(tokens).values()), dtype=torch.float64)
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


def distinct_tokens(tokens: Sequence[int]) -> int:
    """Number of distinct token ids in one sample."""
    return len(set(tokens))


def distinct_n(tokens: Sequence[int], n: int) -> float:
    """Distinct n-grams / total n-grams in one sample (0 when it has no n-gram)."""
    ngrams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def strip_special(ids: torch.Tensor, special_token_ids: Sequence[int]) -> list[list[int]]:
    """(N, L) ids -> per-sample token lists without the given special tokens."""
    special = set(special_token_ids)
    return [[t for t in row if t not in special] for row in ids.tolist()]


def sample_metrics(samples: Sequence[Sequence[int]]) -> list[dict[str, float]]:
    """Per-sample entropy, distinct-token count, distinct-n (n = 1..4) and rep-n (n = 2..4,
    evaluation/diversity.py)."""
    rows = []
    for tokens in samples:
        row = {"entropy": unigram_entropy(tokens), "distinct_tokens": distinct_tokens(tokens)}
        for n in DISTINCT_NS:
            row[f"distinct_{n}"] = distinct_n(tokens, n)
        for n in REP_NS:
            row[f"rep_{n}"] = rep_n(tokens, n)
        rows.append(row)
    return rows


def generative_perplexity(nll_sum: torch.Tensor, n_tokens: torch.Tensor,
                          dtype: torch.dtype = torch.float64) -> float:
    """exp(Σ nll / Σ tokens) over the whole sample set (token-weighted, not a mean of PPLs).

    ``dtype``: precision of the sums and the ratio (float64 clean protocol, float32 paper)."""
    total = int(n_tokens.sum())
    if total == 0:
        raise ValueError("the judge scored no token; check that the samples are not empty")
    mean = nll_sum.to(dtype).sum() / n_tokens.to(dtype).sum()
    return float(torch.exp(mean))
