"""Exact judge for samples of ``data=synthetic`` (``eval.judge=oracle``).

The oracle scores a generated token sequence with the synthetic source's exact
``log p(x)`` (``synthetic.SyntheticSource.log_prob``), in the data tokenizer's ids
(no re-tokenisation; the decoded texts are ignored). Reported numbers:

* ``oracle_nll_per_token`` = sum(-log p) / sum(tokens) over all samples, and the oracle
  generative perplexity ``exp`` of it. A sample the source cannot emit has ``-log p = inf``,
  so one impossible sample makes both ``inf`` (never a crash or nan);
  ``oracle_impossible_fraction`` and ``oracle_nll_per_token_possible`` (over possible
  samples only) say how many and what the rest score.
* ``source_entropy_per_token`` = H(X_1..X_L) / L of the source itself, and
  ``entropy_gap`` = ``oracle_nll_per_token - source_entropy_per_token``. Samples drawn from
  the source give a gap of 0 in expectation. The gap is a cross-entropy difference, not a
  KL divergence: it is negative when a model concentrates on the source's likely
  sequences (low diversity), just as a low generative perplexity can be.
* ``oracle_near_impossible_fraction``: the fraction of transitions (positions 2..L) whose
  conditional probability ``p(x_t | x_<t)`` under the source is below
  ``NEAR_IMPOSSIBLE_PROBABILITY``: a finite NLL on a dense chain can hide samples built of
  transitions the source almost never makes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from data.synthetic import SyntheticSource

log = logging.getLogger(__name__)

ORACLE_JUDGE_NAME = "oracle"
NEAR_IMPOSSIBLE_PROBABILITY = 1e-3  # a transition less likely than this counts as near-impossible


class OracleJudge:
    """Judge protocol: ``score(token_ids, texts) -> (nll_sum (N,), n_tokens (N,))``."""

    name: str = ORACLE_JUDGE_NAME

    def __init__(self, source: SyntheticSource) -> None:
        self.source = source

    def score(
        self, token_ids: torch.Tensor, texts: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact NLL of each sample: (N, L) ids -> float64 (N,) nll sums (inf if impossible),
        long (N,) token counts (every position of a synthetic sequence is a token). ``texts``
        is ignored. Results are on the CPU."""
        nll_sum = -self.source.log_prob(token_ids)
        n_tokens = torch.full((token_ids.shape[0],), token_ids.shape[1], dtype=torch.long)
        return nll_sum, n_tokens

    def report(self, token_ids: torch.Tensor) -> dict[str, float]:
        """Score (N, L) samples and summarise them with ``oracle_report``."""
        nll_sum, n_tokens = self.score(token_ids, None)
        report = oracle_report(nll_sum, n_tokens, self.source, token_ids.shape[1])
        report["oracle_near_impossible_fraction"] = near_impossible_fraction(self.source,
                                                                             token_ids)
        return report


def near_impossible_fraction(source: SyntheticSource, token_ids: torch.Tensor) -> float:
    """Fraction of transitions (positions 2..L of (N, L) samples) with p(x_t | x_<t) below
    ``NEAR_IMPOSSIBLE_PROBABILITY`` under the source; nan for length-1 samples."""
    terms = source.conditional_log_probs(token_ids)[:, 1:]
    if terms.numel() == 0:
        return math.nan
    return float((terms < math.log(NEAR_IMPOSSIBLE_PROBABILITY)).double().mean())


def oracle_report(
    nll_sum: torch.Tensor, n_tokens: torch.Tensor, source: SyntheticSource, length: int
) -> dict[str, float]:
    """Summary of oracle scores of samples of length ``length`` (see module docstring)."""
    nll_sum = nll_sum.to(torch.float64).cpu()
    n_tokens = n_tokens.cpu()
    possible = torch.isfinite(nll_sum)
    total_tokens = float(n_tokens.sum())
    nll_per_token = float(nll_sum.sum()) / total_tokens  # +inf if any sample is impossible
    if bool(possible.any()):
        nll_possible = float(nll_sum[possible].sum()) / float(n_tokens[possible].sum())
    else:
        nll_possible = math.inf
    entropy_per_token = source.sequence_entropy(length) / length
    report = {
        "oracle_nll_per_token": nll_per_token,
        "oracle_gen_ppl": float(torch.tensor(nll_per_token, dtype=torch.float64).exp()),
        "oracle_nll_per_token_possible": nll_possible,
        "oracle_impossible_fraction": float((~possible).double().mean()),
        "source_entropy_per_token": entropy_per_token,
        "source_entropy_rate": source.entropy_rate(),
        "source_entropy_exact": float(source.entropy_is_exact(length)),
        "entropy_gap": nll_per_token - entropy_per_token,
    }
    if not bool(possible.all()):
        log.info(
            "%.1f%% of samples are impossible under the source: oracle NLL is inf",
            100 * report["oracle_impossible_fraction"],
        )
    return report


def build_oracle_judge(data_cfg: Mapping[str, Any]) -> OracleJudge:
    """``eval.judge=oracle``: the exact judge of the source described by ``data_cfg``."""
    if data_cfg.get("name") != "synthetic":
        raise ValueError(
            f"eval.judge=oracle needs data=synthetic (or data=synthetic-hmm); got "
            f"data.name={data_cfg.get('name')!r}. Use eval.judge=<causal LM> for text data."
        )
    return OracleJudge(SyntheticSource.from_config(data_cfg))
