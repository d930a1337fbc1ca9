"""rep-n and self-BLEU (evaluation/diversity.py) against values worked out by hand and, for
self-BLEU, against a second implementation written directly from the BLEU formula."""

import math
import random
from collections import Counter

import pytest

from evaluation.diversity import rep_n, self_bleu, sentence_bleu


def test_rep_n_by_hand():
    # bigrams of 1 2 1 2 1: (1,2) (2,1) (1,2) (2,1): 4 in all, 2 distinct -> 1 - 2/4
    assert rep_n([1, 2, 1, 2, 1], 2) == pytest.approx(0.5)
    # trigrams of 1 2 1 2 1: (1,2,1) (2,1,2) (1,2,1): 3, 2 distinct -> 1 - 2/3
    assert rep_n([1, 2, 1, 2, 1], 3) == pytest.approx(1 / 3)
    # 4-grams of 7 7 7 7 7 7: 3 copies of one -> 1 - 1/3
    assert rep_n([7] * 6, 4) == pytest.approx(2 / 3)
    assert rep_n([1, 2, 3, 4, 5], 2) == 0.0  # nothing repeats
    assert rep_n([1, 2, 3], 4) == 0.0  # no 4-gram at all


def test_self_bleu_by_hand():
    # identical samples: every precision 1, no brevity penalty
    assert self_bleu([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]) == pytest.approx(1.0)
    # 1 2 3 4 vs 1 2 3 5 (and back): p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0 -> smoothed 0.1/1
    expected = (3 / 4 * 2 / 3 * 1 / 2 * 0.1) ** 0.25
    assert self_bleu([[1, 2, 3, 4], [1, 2, 3, 5]]) == pytest.approx(expected)
    # 1 2 3 4 vs 1..6: all precisions 1, c = 4 < r = 6 -> exp(1 - 6/4);
    # 1..6 vs 1 2 3 4: p = 4/6, 3/5, 2/4, 1/3, c >= r -> no penalty
    short = math.exp(1 - 6 / 4)
    long = (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert self_bleu([[1, 2, 3, 4], [1, 2, 3, 4, 5, 6]]) == pytest.approx((short + long) / 2)
    assert self_bleu([[1, 2, 3]]) is None


def _naive_bleu4(hyp, refs):
    """BLEU-4 from the formula: clipped precisions with method-1 smoothing (0 -> 0.1/total),
    geometric mean, brevity penalty against the closest reference length (shorter on ties)."""
    if len(hyp) < 4:
        return 0.0
    logs = []
    for n in (1, 2, 3, 4):
        h = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        matched = 0
        for gram, count in h.items():
            best = max(sum(1 for i in range(len(r) - n + 1) if tuple(r[i:i + n]) == gram)
                       for r in refs)
            matched += min(count, best)
        total = len(hyp) - n + 1
        logs.append(math.log(matched / total if matched else 0.1 / total))
    lengths = sorted(len(r) for r in refs)
    r = min(lengths, key=lambda x: (abs(x - len(hyp)), x))
    bp = 1.0 if len(hyp) >= r else math.exp(1 - r / len(hyp))
    return bp * math.exp(sum(logs) / 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_bleu_matches_formula_on_random_samples(seed):
    rng = random.Random(seed)
    vocab = rng.choice([3, 5, 8])
    samples = [[rng.randrange(vocab) for _ in range(rng.randint(2, 14))] for _ in range(7)]
    naive = [_naive_bleu4(s, samples[:i] + samples[i + 1:]) for i, s in enumerate(samples)]
    assert self_bleu(samples) == pytest.approx(sum(naive) / len(naive), rel=1e-12)
    for i, s in enumerate(samples):  # the per-sentence function agrees too
        assert sentence_bleu(s, samples[:i] + samples[i + 1:]) == pytest.approx(naive[i])


def test_self_bleu_with_ids_too_wide_to_pack_matches_formula():
    """Ids above 2^16: 4-grams no longer pack into 64 bits (the lexicographic-sort path)."""
    rng = random.Random(7)
    alphabet = [0, 5, 2 ** 40, 2 ** 40 + 1]
    samples = [[rng.choice(alphabet) for _ in range(rng.randint(3, 12))] for _ in range(6)]
    naive = [_naive_bleu4(s, samples[:i] + samples[i + 1:]) for i, s in enumerate(samples)]
    assert self_bleu(samples) == pytest.approx(sum(naive) / len(naive), rel=1e-12)
