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

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

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


def _ngram_ids(grams: np.ndarray) -> np.ndarray:
    """Ids 0..G-1 of the distinct rows of (M, n) non-negative int64 n-grams: (M,). Rows are
    packed exactly into one uint64 when n · bits(largest id) <= 64 (e.g. n <= 4 for ids
    below 2^16), else sorted lexicographically."""
    bits = max(int(grams.max()).bit_length(), 1)
    if bits * grams.shape[1] <= 64:
        packed = np.zeros(len(grams), dtype=np.uint64)
        for column in grams.T:
            packed = (packed << np.uint64(bits)) | column.astype(np.uint64)
        return np.unique(packed, return_inverse=True)[1].reshape(-1)
    by_gram = np.lexsort(grams.T[::-1])
    new = np.r_[True, (np.diff(grams[by_gram], axis=0) != 0).any(axis=1)]
    ids = np.empty(len(grams), dtype=np.int64)
    ids[by_gram] = np.cumsum(new) - 1
    return ids


def _clipped_matches(samples: Sequence[Sequence[int]], n: int) -> np.ndarray:
    """Per sample, its n-gram occurrences matched by all other samples as references, each
    n-gram clipped at its largest count in any one other sample: (N,) int64.

    Vectorised: n-grams get ids (``_ngram_ids``), (sample, n-gram) pairs their counts, and
    per n-gram the largest count, the sample holding it and the second largest; the bound of
    sample i is the largest count unless sample i holds it, then the second (linear work in
    the number of n-grams, not quadratic in the number of samples)."""
    windows, owners = [], []
    for i, tokens in enumerate(samples):
        if len(tokens) >= n:
            windows.append(sliding_window_view(np.asarray(tokens, dtype=np.int64), n))
            owners.append(np.full(len(tokens) - n + 1, i, dtype=np.int64))
    clipped = np.zeros(len(samples), dtype=np.int64)
    if not windows:
        return clipped
    gram = _ngram_ids(np.concatenate(windows))
    num_grams = int(gram.max()) + 1
    pairs, count = np.unique(np.concatenate(owners) * num_grams + gram, return_counts=True)
    sample, gram = pairs // num_grams, pairs % num_grams
    order = np.lexsort((-count, gram))  # by n-gram, largest count first
    gram_sorted, count_sorted = gram[order], count[order]
    first_of_gram = np.r_[True, gram_sorted[1:] != gram_sorted[:-1]]
    first = np.zeros(num_grams, dtype=np.int64)
    holder = np.full(num_grams, -1, dtype=np.int64)
    first[gram_sorted[first_of_gram]] = count_sorted[first_of_gram]
    holder[gram_sorted[first_of_gram]] = sample[order][first_of_gram]
    second = np.zeros(num_grams, dtype=np.int64)
    runner_up = np.r_[False, first_of_gram[:-1] & ~first_of_gram[1:]]  # 2nd entry of a gram
    second[gram_sorted[runner_up]] = count_sorted[runner_up]
    bound = np.where(holder[gram] == sample, second[gram], first[gram])
    return np.bincount(sample, weights=np.minimum(count, bound),
                       minlength=len(samples)).astype(np.int64)


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
    with one pass over the n-grams per order (``_clipped_matches``)."""
    if len(samples) < 2:
        return None
    clipped = [_clipped_matches(samples, n) for n in range(1, BLEU_ORDER + 1)]
    lengths = [len(tokens) for tokens in samples]
    scores = []
    for i, c in enumerate(lengths):
        matches = [(int(clipped[n - 1][i]), max(c - n + 1, 0))
                   for n in range(1, BLEU_ORDER + 1)]
        others = lengths[:i] + lengths[i + 1:]
        scores.append(_bleu(c, _closest_length(c, others), matches))
    return sum(scores) / len(scores)
