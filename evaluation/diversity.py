"""Repetition and self-BLEU of a sample set: diversity columns beside distinct-n and MAUVE.

Gen PPL alone rewards low-entropy, repetitive samples (docs/math.md §8); these columns
measure repetition within a sample (``rep_n``) and similarity across samples
(``self_bleu``) on token ids (no tokenisation of text), over the tokens the caller passes
(the protocol's special-token rule, as for entropy and distinct-n).

* ``rep_n(tokens, n) = 1 - |distinct n-grams| / |n-grams|`` of one sample (0 when it has
  no n-gram): the fraction of its n-gram occurrences that repeat an earlier one. The set
  value is the mean over samples.
* ``self_bleu``: each sample is the hypothesis and all *other* samples are its references;
  BLEU-4 (Papineni et al. 2002) with uniform weights 1/4 over n = 1..4, clipped n-gram
  counts (a hypothesis n-gram counts at most its largest count in any one reference), the
  brevity penalty ``exp(1 - r/c)`` when ``c < r`` (c: hypothesis length, r: the reference
  length closest to c, the shorter on a tie) and smoothing method 1 of Chen & Cherry
  (2014): a precision whose clipped count is 0 is taken as ``SMOOTHING_EPSILON / total``.
  The set value is the mean over samples (needs at least 2 samples; a hypothesis shorter
  than 1 token scores 0).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

REP_NS = (2, 3, 4)
BLEU_ORDER = 4  # self-BLEU is BLEU-4
SMOOTHING_EPSILON = 0.1  # Chen & Cherry method 1 (NLTK's SmoothingFunction().method1 default)


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """Every n-gram of a token list in order (len - n + 1 of them, none when shorter)."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def rep_n(tokens: Sequence[int], n: int) -> float:
    """1 - distinct n-grams / total n-grams of one sample (0 when it has no n-gram)."""
    grams = ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _top_two_counts(samples: Sequence[Sequence[int]], n: int,
                    ) -> tuple[list[Counter], dict[tuple[int, ...], tuple[int, int, int]]]:
    """Per-sample n-gram counts and, per n-gram, (largest count, its sample, second largest
    count over the other samples): the clipping bound of sample i against all others is the
    largest count unless sample i holds it, then the second (linear, not quadratic, work)."""
    counts = [Counter(ngrams(tokens, n)) for tokens in samples]
    top: dict[tuple[int, ...], tuple[int, int, int]] = {}
    for i, sample_counts in enumerate(counts):
        for gram, count in sample_counts.items():
            first, owner, second = top.get(gram, (0, -1, 0))
            if count > first:
                top[gram] = (count, i, first)
            else:
                top[gram] = (first, owner, max(second, count))
    return counts, top


def _bleu(c: int, r: int, matches: Sequence[tuple[int, int]]) -> float:
    """BLEU-4 from the hypothesis length c, the closest reference length r and, per order
    n = 1..4, (clipped matches, hypothesis n-grams)."""
    if c == 0 or any(total == 0 for _, total in matches):
        return 0.0
    log_precision = sum(math.log(clipped / total if clipped else SMOOTHING_EPSILON / total)
                        for clipped, total in matches) / BLEU_ORDER
    brevity = 1.0 if c >= r else math.exp(1.0 - r / c)
    return brevity * math.exp(log_precision)


def _closest_length(c: int, lengths: Sequence[int]) -> int:
    """The reference length closest to c, the shorter on a tie."""
    return min(lengths, key=lambda length: (abs(length - c), length))


def sentence_bleu(hypothesis: Sequence[int], references: Sequence[Sequence[int]]) -> float:
    """BLEU-4 of one hypothesis against its references (module docstring's definition)."""
    if not references:
        return 0.0
    matches = []
    for n in range(1, BLEU_ORDER + 1):
        grams = Counter(ngrams(hypothesis, n))
        bound: Counter = Counter()
        for reference in references:
            for gram, count in Counter(ngrams(reference, n)).items():
                bound[gram] = max(bound[gram], count)
        matches.append((sum(min(k, bound[g]) for g, k in grams.items()), sum(grams.values())))
    return _bleu(len(hypothesis), _closest_length(len(hypothesis),
                                                  [len(ref) for ref in references]), matches)


def self_bleu(samples: Sequence[Sequence[int]]) -> float | None:
    """Mean over samples of the BLEU-4 of each against all the others; None for < 2 samples.

    Equals the mean of ``sentence_bleu(samples[i], samples[:i] + samples[i+1:])``, computed
    with one pass over the n-grams per order (``_top_two_counts``)."""
    if len(samples) < 2:
        return None
    per_order = [_top_two_counts(samples, n) for n in range(1, BLEU_ORDER + 1)]
    lengths = [len(tokens) for tokens in samples]
    scores = []
    for i in range(len(samples)):
        matches = []
        for counts, top in per_order:
            clipped = 0
            for gram, count in counts[i].items():
                first, owner, second = top[gram]
                clipped += min(count, second if owner == i else first)
            matches.append((clipped, sum(counts[i].values())))
        others = lengths[:i] + lengths[i + 1:]
        scores.append(_bleu(lengths[i], _closest_length(lengths[i], others), matches))
    return sum(scores) / len(scores)
