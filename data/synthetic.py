"""Exact-likelihood synthetic source (``data=synthetic``).

A seeded random source over ``V`` tokens whose probability of any sequence is
known exactly, so samples of a trained model can be judged exactly (see
``evaluation/oracle.py``). Two kinds (``data.source_kind``):

* ``markov``: a sparse random Markov chain on the tokens. Each state ``i`` has
  ``k`` allowed successors with Dirichlet-random probabilities ``P[i]``; the
  first token follows ``initial_distribution``. One successor of every state
  lies on a random cycle through all states, so the chain is irreducible and
  its stationary distribution ``pi`` is unique. The rows are kept sparse:
  ``successors`` and ``successor_probs``, both (S, k); sampling, ``log_prob``
  and the entropies read that form, so V = 50258 sets up in seconds
  (``transition_np`` builds the dense (S, S) matrix on request, small S only).
* ``hmm``: a hidden Markov model. The hidden chain is built as above over
  ``num_hidden`` states; each hidden state emits one of ``num_emissions``
  tokens with Dirichlet-random probabilities (sparse: ``emission_tokens`` and
  ``emission_probs``, (H, m)). ``log p(x)`` is the forward algorithm in log-space.

The Bayes-optimal FLM denoiser of this source is ``exact_denoiser.ExactDenoiser``.

Conventions (the data hooks at the bottom follow them):

* No special tokens: every position of a sequence is a chain state (or an
  emission), there is no BOS/EOS/padding, and ``attention_mask`` is all ones.
  The tokenizer decodes id ``12`` to the text ``"t12"``.
* An example is one window of ``L`` tokens started from the initial
  distribution (never packed, ``wrap`` must be false).
* Probabilities are float64. ``log_prob`` is the natural log, ``-inf`` for an
  impossible sequence (including token ids outside ``[0, V)``).

Entropies, in nats:

* ``markov``: ``entropy_rate() = -sum_i pi_i sum_j P_ij log P_ij`` and
  ``sequence_entropy(L) = H(X_1) + sum_{t=1}^{L-1} sum_i mu_t(i) H(P_i)`` with
  ``mu_t`` the law of ``X_t``; for a stationary start this is
  ``H(pi) + (L-1) * entropy_rate()``. Both are exact.
* ``hmm``: ``sequence_entropy(L)`` is exact by enumeration of all ``V**L``
  sequences when that is at most ``ENUMERATION_LIMIT``, otherwise a Monte Carlo
  estimate ``mean(-log p(X))`` over ``entropy_mc_samples`` sampled sequences.
  ``entropy_rate()`` is always an estimate: the mean conditional NLL
  ``-log p(x_t | x_<t)`` over positions ``ENTROPY_RATE_BURN_IN < t <=
  ENTROPY_RATE_LENGTH`` of sampled sequences. ``H(X_t | X_<t)`` decreases to
  the entropy rate (Cover & Thomas, Thm 4.5.1), so the estimate is biased
  upwards by a term that decays geometrically with the burn-in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

SOURCE_KINDS = ("markov", "hmm")
INITIAL_DISTRIBUTIONS = ("stationary", "random", "uniform")
TOKEN_TEXT_PREFIX = "t"  # id 12 decodes to "t12"
CONFIG_FILE = "configs/data/synthetic.yaml"

ENUMERATION_LIMIT = 2**20  # most sequences enumerated for an exact HMM sequence entropy
ENTROPY_RATE_LENGTH = 512  # hmm entropy-rate estimator: length of each sampled sequence
ENTROPY_RATE_BURN_IN = 256  # hmm entropy-rate estimator: positions skipped before averaging
ENTROPY_RATE_SEQUENCES = 256  # hmm entropy-rate estimator: number of sampled sequences
ENTROPY_MC_SEED_OFFSET = 7919  # entropy estimators draw from source_seed + this offset
FORWARD_ELEMENT_BUDGET = 2**23  # float64 elements per forward-algorithm chunk (64 MiB)
STATIONARY_RESIDUAL_TOL = 1e-9  # max |pi P - pi| accepted for the stationary law
DENSE_SOLVE_LIMIT = 4096  # states up to which pi comes from a dense solve (else power iteration)
POWER_ITERATIONS = 100_000  # most lazy-chain power iterations for pi beyond DENSE_SOLVE_LIMIT
DENSE_ELEMENT_LIMIT = 2**26  # largest dense matrix (elements) ``densify`` builds on request
UNBOUNDED_DATASET_LENGTH = 2**31 - 1  # len() of the train set when train_size is null
SPLIT_STREAMS = {"train": 0, "valid": 1}  # counter-RNG stream per split

_UINT64_MASK = (1 << 64) - 1
_UNIT_53 = 2.0**-53


# --------------------------------------------------------------------------------------
# Random parameters


def _row_probabilities(rng: np.random.Generator, support: int, alpha: float | None) -> np.ndarray:
    """One row's probabilities over its ``support`` allowed entries."""
    if alpha is None:
        return np.full(support, 1.0 / support)
    return rng.dirichlet(np.full(support, alpha))


def _sparse_transition_rows(
    rng: np.random.Generator, num_states: int, num_successors: int, alpha: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Sparse row-stochastic matrix as (S, k) successor ids (sorted per row) and their (S, k)
    probabilities; one successor of row i is on a random Hamiltonian cycle (keeps the chain
    irreducible). No (S, S) array is made: O(S k) time and memory."""
    order = rng.permutation(num_states)
    cycle_next = np.empty(num_states, dtype=np.int64)
    cycle_next[order] = np.roll(order, -1)
    successors = np.empty((num_states, num_successors), dtype=np.int64)
    probabilities = np.empty((num_states, num_successors))
    for state in range(num_states):
        # k - 1 distinct states other than cycle_next: draw from 0..S-2 and skip cycle_next
        extra = rng.choice(num_states - 1, size=num_successors - 1, replace=False)
        extra = extra + (extra >= cycle_next[state])
        successors[state, 0] = cycle_next[state]
        successors[state, 1:] = extra
        probabilities[state] = _row_probabilities(rng, num_successors, alpha)
    return _sorted_rows(successors, probabilities)


def _sorted_rows(columns: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each sparse row by column id (then inverse-CDF draws match the dense rows')."""
    order = np.argsort(columns, axis=1, kind="stable")
    return np.take_along_axis(columns, order, 1), np.take_along_axis(values, order, 1)


def _sparse_emission_rows(
    rng: np.random.Generator, num_hidden: int, vocab_size: int, num_emissions: int,
    alpha: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(H, m) emitted token ids (sorted per row) and their (H, m) probabilities."""
    tokens = np.empty((num_hidden, num_emissions), dtype=np.int64)
    probabilities = np.empty((num_hidden, num_emissions))
    for state in range(num_hidden):
        tokens[state] = rng.choice(vocab_size, size=num_emissions, replace=False)
        probabilities[state] = _row_probabilities(rng, num_emissions, alpha)
    return _sorted_rows(tokens, probabilities)


def densify(columns: np.ndarray, values: np.ndarray, num_columns: int) -> np.ndarray:
    """(R, k) sparse rows -> dense (R, num_columns) (small sizes only: tests, small HMMs)."""
    rows = columns.shape[0]
    if rows * num_columns > DENSE_ELEMENT_LIMIT:
        raise ValueError(
            f"a dense ({rows}, {num_columns}) matrix exceeds DENSE_ELEMENT_LIMIT="
            f"{DENSE_ELEMENT_LIMIT} (data/synthetic.py); use the sparse (rows, k) form"
        )
    dense = np.zeros((rows, num_columns))
    np.put_along_axis(dense, columns, values, axis=1)
    return dense


def sparse_vector_matrix(
    vector: np.ndarray, columns: np.ndarray, values: np.ndarray, num_columns: int
) -> np.ndarray:
    """v @ M for a sparse (R, k) matrix M: (R,) -> (num_columns,)."""
    weights = (vector[:, None] * values).ravel()
    return np.bincount(columns.ravel(), weights=weights, minlength=num_columns)


def stationary_distribution(successors: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """pi with pi P = pi, sum(pi) = 1, of an irreducible chain in sparse (S, k) form -> (S,).

    Up to ``DENSE_SOLVE_LIMIT`` states: a dense linear solve. Beyond: power iteration on the
    lazy chain (P + I) / 2 (same pi, aperiodic), until the residual is below
    ``STATIONARY_RESIDUAL_TOL``.
    """
    num_states = successors.shape[0]
    if num_states <= DENSE_SOLVE_LIMIT:
        transition = densify(successors, probabilities, num_states)
        system = transition.T - np.eye(num_states)
        system[-1, :] = 1.0  # replace one (redundant) balance equation by the normalisation
        rhs = np.zeros(num_states)
        rhs[-1] = 1.0
        pi = np.linalg.solve(system, rhs)
    else:
        pi = np.full(num_states, 1.0 / num_states)
        for _ in range(POWER_ITERATIONS):
            step = sparse_vector_matrix(pi, successors, probabilities, num_states)
            if np.abs(step - pi).max() <= STATIONARY_RESIDUAL_TOL / 2:
                break
            pi = 0.5 * (pi + step)
    residual = np.abs(sparse_vector_matrix(pi, successors, probabilities, num_states) - pi).max()
    if pi.min() < -STATIONARY_RESIDUAL_TOL or residual > STATIONARY_RESIDUAL_TOL:
        raise ValueError(
            f"stationary distribution is ill-conditioned or unconverged (min {pi.min():.3g}, "
            f"residual {residual:.3g}); raise data.dirichlet_alpha or data.num_successors, or "
            "change data.source_seed"
        )
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def _initial_distribution(
    rng: np.random.Generator, kind: str, stationary: np.ndarray, alpha: float | None
) -> np.ndarray:
    num_states = stationary.shape[0]
    if kind == "stationary":
        return stationary.copy()
    if kind == "random":
        return _row_probabilities(rng, num_states, alpha)
    return np.full(num_states, 1.0 / num_states)


def _entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) along the last axis, with 0 log 0 = 0."""
    safe = np.where(probabilities > 0, probabilities, 1.0)
    return -(probabilities * np.log(safe)).sum(-1)


# --------------------------------------------------------------------------------------
# Counter-based uniforms: sequence i of a split is a pure function of (seed, split, i)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, a bijective hash on uint64 arrays (wrap-around arithmetic)."""
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def counter_uniforms(
    seed: int, stream: int, indices: Sequence[int] | np.ndarray, length: int, channels: int
) -> torch.Tensor:
    """Uniforms in [0, 1) that depend only on (seed, stream, index, position, channel).

    Returns (n, length, channels) float64 for n = len(indices).
    """
    base = _splitmix64(np.array([seed & _UINT64_MASK], dtype=np.uint64))
    base = _splitmix64(base ^ np.uint64(stream & _UINT64_MASK))
    rows = _splitmix64(base + np.asarray(indices, dtype=np.int64).astype(np.uint64))
    counters = np.arange(length * channels, dtype=np.uint64)
    bits = _splitmix64(rows[:, None] + counters[None, :])
    uniforms = (bits >> np.uint64(11)).astype(np.float64) * _UNIT_53
    return torch.from_numpy(uniforms.reshape(len(rows), length, channels))


def _inverse_cdf(cdf_rows: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw per row: (n, S) cumulative rows, (n,) uniforms in [0, 1) -> (n,) indices.

    Rows are normalised so the last entry is exactly 1; ``right=True`` never returns an
    entry of probability zero.
    """
    return torch.searchsorted(cdf_rows, uniforms.contiguous()[:, None], right=True)[:, 0]


def _cumulative(probabilities: torch.Tensor) -> torch.Tensor:
    cdf = probabilities.cumsum(-1)
    return cdf / cdf[..., -1:]


# --------------------------------------------------------------------------------------
# The source


class SyntheticSource:
    """Seeded Markov chain or HMM over ``vocab_size`` tokens with exact ``log_prob``.

    Parameters live on the CPU in float64; inputs on another device are moved to the CPU
    and results are returned there.
    """

    def __init__(
        self,
        source_kind: str = "markov",
        vocab_size: int = 64,
        num_successors: int | None = 4,
        dirichlet_alpha: float | None = 1.0,
        initial_distribution: str = "stationary",
        num_hidden: int = 16,
        num_emissions: int | None = 8,
        source_seed: int = 0,
        entropy_mc_samples: int = 4096,
    ) -> None:
        if source_kind not in SOURCE_KINDS:
            raise ValueError(f"data.source_kind={source_kind!r}; use one of {SOURCE_KINDS}")
        if initial_distribution not in INITIAL_DISTRIBUTIONS:
            raise ValueError(
                f"data.initial_distribution={initial_distribution!r}; use one of "
                f"{INITIAL_DISTRIBUTIONS}"
            )
        if vocab_size < 2:
            raise ValueError(f"data.vocab_size={vocab_size}; use at least 2")
        if dirichlet_alpha is not None and not dirichlet_alpha > 0:
            raise ValueError(f"data.dirichlet_alpha={dirichlet_alpha}; use > 0 or null (uniform)")
        if entropy_mc_samples < 2:
            raise ValueError(f"data.entropy_mc_samples={entropy_mc_samples}; use at least 2")
        num_states = vocab_size if source_kind == "markov" else num_hidden
        if num_states < 2:
            raise ValueError(f"data.num_hidden={num_hidden}; use at least 2")
        num_successors = num_states if num_successors is None else num_successors
        if not 1 <= num_successors <= num_states:
            raise ValueError(
                f"data.num_successors={num_successors}; use 1..{num_states} (the number of "
                f"{'tokens' if source_kind == 'markov' else 'hidden states'}) or null (all)"
            )
        self.source_kind = source_kind
        self.vocab_size = vocab_size
        self.source_seed = source_seed
        self.entropy_mc_samples = entropy_mc_samples
        self._rate_cache: tuple[float, float] | None = None
        self._sequence_entropy_cache: dict[int, float] = {}

        rng = np.random.default_rng(source_seed)
        successors, probabilities = _sparse_transition_rows(
            rng, num_states, num_successors, dirichlet_alpha
        )
        # sparse rows: row i of the (S, S) transition matrix has P[i, successors[i, j]] =
        # successor_probs[i, j]; no (S, S) array is kept (``transition_np`` densifies on demand)
        self.successors = successors  # (S, k) int64, sorted per row
        self.successor_probs = probabilities  # (S, k) float64, rows sum to 1
        self.stationary_np = stationary_distribution(successors, probabilities)  # (S,)
        self.initial_np = _initial_distribution(
            rng, initial_distribution, self.stationary_np, dirichlet_alpha
        )  # (S,)
        self.initial = torch.from_numpy(self.initial_np)
        self._successors = torch.from_numpy(successors)
        self._successor_cdf = _cumulative(torch.from_numpy(probabilities))  # (S, k)
        self._log_successor_probs = torch.from_numpy(np.log(probabilities))  # (S, k)
        self._initial_cdf = _cumulative(self.initial)
        self._log_initial = torch.log(self.initial)
        if source_kind == "hmm":
            num_emissions = vocab_size if num_emissions is None else num_emissions
            if not 1 <= num_emissions <= vocab_size:
                raise ValueError(
                    f"data.num_emissions={num_emissions}; use 1..{vocab_size} or null (all)"
                )
            tokens, emission_probs = _sparse_emission_rows(
                rng, num_hidden, vocab_size, num_emissions, dirichlet_alpha
            )
            self.emission_tokens = tokens  # (H, m) int64, sorted per row
            self.emission_probs = emission_probs  # (H, m) float64, rows sum to 1
            self._emission_tokens = torch.from_numpy(tokens)
            self._emission_cdf = _cumulative(torch.from_numpy(emission_probs))  # (H, m)
            log_emission_t = torch.full((vocab_size, num_hidden), -math.inf, dtype=torch.float64)
            log_emission_t[torch.from_numpy(tokens), torch.arange(num_hidden)[:, None]] = (
                torch.from_numpy(np.log(emission_probs))
            )
            self._log_emission_t = log_emission_t  # (V, H); log 0 = -inf
            self._log_transition = torch.log(torch.from_numpy(self.transition_np))  # (H, H)

    @property
    def transition_np(self) -> np.ndarray:
        """Dense (S, S) transition matrix, built on request (small S only, ``densify``)."""
        return densify(self.successors, self.successor_probs, self.num_states)

    @property
    def emission_np(self) -> np.ndarray:
        """hmm: dense (H, V) emission matrix, built on request (small sizes, ``densify``)."""
        if self.source_kind != "hmm":
            raise AttributeError("emission_np: a markov source has no emissions")
        return densify(self.emission_tokens, self.emission_probs, self.vocab_size)

    @classmethod
    def from_config(cls, data_cfg: Mapping[str, Any]) -> SyntheticSource:
        """Build from the ``data`` config group (``configs/data/synthetic*.yaml``)."""
        if data_cfg.get("name") != "synthetic":
            raise ValueError(
                f"data.name={data_cfg.get('name')!r}: the synthetic source needs data=synthetic "
                "(or data=synthetic-hmm)"
            )
        keys = (
            "source_kind", "vocab_size", "num_successors", "dirichlet_alpha",
            "initial_distribution", "num_hidden", "num_emissions", "source_seed",
            "entropy_mc_samples",
        )
        missing = [key for key in keys if key not in data_cfg]
        if missing:
            raise KeyError(f"data config lacks {missing}; see {CONFIG_FILE} for every key")
        return cls(**{key: data_cfg[key] for key in keys})

    @property
    def num_states(self) -> int:
        """S: tokens for markov, hidden states for hmm."""
        return self.successors.shape[0]

    # ---- sampling ---------------------------------------------------------------------

    def sample(self, n: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw n independent sequences: -> LongTensor (n, length)."""
        uniforms = torch.rand(n, length, 2, generator=generator, dtype=torch.float64)
        return self.tokens_from_uniforms(uniforms)

    def tokens_from_uniforms(self, uniforms: torch.Tensor) -> torch.Tensor:
        """Inverse-CDF sampling: (n, L, 2) uniforms in [0, 1) -> LongTensor (n, L).

        Channel 0 drives the (hidden) chain, channel 1 the HMM emissions (unused for markov).
        """
        n, length, _ = uniforms.shape
        if length < 1:
            raise ValueError(f"sequence length {length}; use at least 1")
        states = torch.empty(n, length, dtype=torch.long)
        state = torch.searchsorted(self._initial_cdf, uniforms[:, 0, 0].contiguous(), right=True)
        states[:, 0] = state
        for position in range(1, length):
            slot = _inverse_cdf(self._successor_cdf[state], uniforms[:, position, 0])
            state = self._successors[state, slot]
            states[:, position] = state
        if self.source_kind == "markov":
            return states
        flat = states.reshape(-1)
        slot = _inverse_cdf(self._emission_cdf[flat], uniforms[..., 1].reshape(-1))  # (n*L,)
        return self._emission_tokens[flat, slot].reshape(n, length)

    # ---- likelihood -------------------------------------------------------------------

    def prefix_log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_1..x_t) for every prefix: LongTensor (n, L) -> float64 (n, L)."""
        return self.conditional_log_probs(tokens).cumsum(dim=1)

    def conditional_log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_t | x_<t) for every position: LongTensor (n, L) -> float64 (n, L);
        -inf for an impossible token (and, for hmm, every token after an impossible prefix)."""
        tokens = tokens.detach().to("cpu", torch.long)
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (n, L); got shape {tuple(tokens.shape)}")
        in_range = (tokens >= 0) & (tokens < self.vocab_size)
        num_out = int((~in_range).sum())
        if num_out:
            log.warning(
                "%d token ids outside [0, %d): scored as impossible (log p = -inf)",
                num_out, self.vocab_size,
            )
        safe = tokens.clamp(0, self.vocab_size - 1)
        if self.source_kind == "markov":
            terms = torch.empty(tokens.shape, dtype=torch.float64)
            terms[:, 0] = self._log_initial[safe[:, 0]]
            terms[:, 1:] = self.log_transition_probs(safe[:, :-1], safe[:, 1:])
        else:
            terms = self._hmm_conditional_log_probs(safe)
        return terms.masked_fill(~in_range, -math.inf)

    def log_transition_probs(self, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """log P[a, b] from the sparse rows: LongTensors (...), (...) -> float64 (...);
        -inf where b is not a successor of a."""
        rows = self._successors[previous]  # (..., k)
        match = rows == current[..., None]
        logs = self._log_successor_probs[previous].masked_fill(~match, -math.inf)
        return logs.max(dim=-1).values  # at most one match per row

    def log_prob(self, tokens: torch.Tensor) -> torch.Tensor:
        """Exact natural-log probability: LongTensor (n, L) -> float64 (n,); -inf if impossible."""
        return self.prefix_log_probs(tokens)[:, -1]

    def _hmm_conditional_log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Forward algorithm in log-space: (n, L) -> (n, L) terms log p(x_t | x_<t).

        A term after an impossible prefix is -inf, so the cumulative sum stays -inf.
        """
        n, length = tokens.shape
        hidden = self.num_states
        chunk = max(1, FORWARD_ELEMENT_BUDGET // (hidden * hidden))
        out = torch.empty(n, length, dtype=torch.float64)
        for start in range(0, n, chunk):
            block = tokens[start : start + chunk]
            # log_alpha[b, h] = log p(x_<=t, h_t = h); log_norm = log p(x_<=t)
            log_alpha = self._log_initial[None, :] + self._log_emission_t[block[:, 0]]
            log_norm = torch.logsumexp(log_alpha, dim=1)
            out[start : start + chunk, 0] = log_norm
            for position in range(1, length):
                log_pred = torch.logsumexp(
                    log_alpha[:, :, None] + self._log_transition[None], dim=1
                )  # (b, H, H) -> (b, H)
                log_alpha = log_pred + self._log_emission_t[block[:, position]]
                new_norm = torch.logsumexp(log_alpha, dim=1)
                # -inf - (-inf) would be nan: an impossible prefix keeps contributing -inf
                out[start : start + chunk, position] = torch.where(
                    torch.isfinite(log_norm), new_norm - log_norm, -math.inf
                )
                log_norm = new_norm
        return out

    # ---- entropies --------------------------------------------------------------------

    def entropy_rate(self) -> float:
        """Entropy rate in nats/token (markov: exact; hmm: estimate, see module docstring)."""
        if self.source_kind == "markov":
            return float(self.stationary_np @ _entropy(self.successor_probs))
        return self.entropy_rate_estimate()[0]

    def entropy_rate_estimate(self) -> tuple[float, float]:
        """HMM entropy-rate estimate and its Monte Carlo standard error (cached)."""
        if self._rate_cache is None:
            generator = torch.Generator().manual_seed(self.source_seed + ENTROPY_MC_SEED_OFFSET)
            tokens = self.sample(ENTROPY_RATE_SEQUENCES, ENTROPY_RATE_LENGTH, generator)
            prefix = self.prefix_log_probs(tokens)
            window = ENTROPY_RATE_LENGTH - ENTROPY_RATE_BURN_IN
            per_sequence = -(prefix[:, -1] - prefix[:, ENTROPY_RATE_BURN_IN - 1]) / window
            self._rate_cache = _mean_and_stderr(per_sequence)
            log.info("entropy-rate estimate %.6f +- %.6f nats/token", *self._rate_cache)
        return self._rate_cache

    def entropy_is_exact(self, length: int) -> bool:
        """Whether ``sequence_entropy(length)`` is exact (else a Monte Carlo estimate)."""
        return self.source_kind == "markov" or self.vocab_size**length <= ENUMERATION_LIMIT

    def sequence_entropy(self, length: int) -> float:
        """H(X_1..X_L) in nats for a window started from the initial distribution."""
        if length in self._sequence_entropy_cache:
            return self._sequence_entropy_cache[length]
        if self.source_kind == "markov":
            law = self.initial_np.copy()
            row_entropy = _entropy(self.successor_probs)
            value = float(_entropy(law))
            for _ in range(length - 1):
                value += float(law @ row_entropy)
                law = sparse_vector_matrix(law, self.successors, self.successor_probs,
                                           self.num_states)
        elif self.entropy_is_exact(length):
            value = self.enumerated_sequence_entropy(length)
        else:
            seed = self.source_seed + ENTROPY_MC_SEED_OFFSET
            value, stderr = self.monte_carlo_sequence_entropy(
                length, self.entropy_mc_samples, seed
            )
            log.info("sequence entropy (L=%d) estimate %.4f +- %.4f nats", length, value, stderr)
        self._sequence_entropy_cache[length] = value
        return value

    def enumerated_sequence_entropy(self, length: int) -> float:
        """Exact -sum_x p(x) log p(x) over all V**length sequences (small cases only)."""
        total = self.vocab_size**length
        if total > ENUMERATION_LIMIT:
            raise ValueError(
                f"enumerating {self.vocab_size}**{length} sequences exceeds ENUMERATION_LIMIT="
                f"{ENUMERATION_LIMIT} (data/synthetic.py); use monte_carlo_sequence_entropy"
            )
        entropy = 0.0
        chunk = max(1, FORWARD_ELEMENT_BUDGET // (self.num_states**2))
        for start in range(0, total, chunk):
            log_p = self.log_prob(all_sequences(self.vocab_size, length, start, chunk))
            possible = torch.isfinite(log_p)
            entropy -= float((log_p[possible].exp() * log_p[possible]).sum())
        return entropy

    def monte_carlo_sequence_entropy(
        self, length: int, num_samples: int, seed: int
    ) -> tuple[float, float]:
        """Estimate of H(X_1..X_L) = E[-log p(X)] and its standard error."""
        generator = torch.Generator().manual_seed(seed)
        return _mean_and_stderr(-self.log_prob(self.sample(num_samples, length, generator)))


def _mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


def all_sequences(
    vocab_size: int, length: int, start: int = 0, count: int | None = None
) -> torch.Tensor:
    """Sequences number start..start+count-1 of {0..V-1}^L in lexicographic order: -> (n, L)."""
    stop = vocab_size**length if count is None else min(vocab_size**length, start + count)
    codes = torch.arange(start, stop, dtype=torch.long)
    powers = vocab_size ** torch.arange(length - 1, -1, -1, dtype=torch.long)
    return (codes[:, None] // powers[None, :]) % vocab_size


# --------------------------------------------------------------------------------------
# Data hooks called by data/module.py and data/tokenizers.py


class SyntheticTokenizer:
    """Minimal tokenizer for chain states: id 12 <-> text "t12"; no special tokens."""

    bos_token_id = None
    eos_token_id = None
    pad_token_id = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """(L,) ids -> "t12 t5 ..." (skip_special_tokens is accepted; there are none)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return " ".join(f"{TOKEN_TEXT_PREFIX}{int(i)}" for i in ids)

    def batch_decode(
        self, ids: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False
    ) -> list[str]:
        """(N, L) ids -> N strings."""
        return [self.decode(row) for row in ids]

    def encode(self, text: str) -> list[int]:
        """Inverse of ``decode``: "t12 t5" -> [12, 5]."""
        ids = []
        for word in text.split():
            if not word.startswith(TOKEN_TEXT_PREFIX) or not word[1:].isdigit():
                raise ValueError(f"{word!r} is not a synthetic token (expected e.g. 't12')")
            token = int(word[len(TOKEN_TEXT_PREFIX) :])
            if token >= self.vocab_size:
                raise ValueError(f"{word!r} is outside the vocabulary of {self.vocab_size}")
            ids.append(token)
        return ids


class SyntheticSequences(Dataset):
    """Sequences of a split, each a pure function of (data_seed, split, index): deterministic,
    resumable and independent of worker layout. Batched access via ``__getitems__``."""

    def __init__(
        self, source: SyntheticSource, length: int, size: int, data_seed: int, split: str
    ) -> None:
        if split not in SPLIT_STREAMS:
            raise ValueError(f"split={split!r}; use one of {tuple(SPLIT_STREAMS)}")
        self.source = source
        self.length = length
        self.size = size
        self.data_seed = data_seed
        self.stream = SPLIT_STREAMS[split]

    def __len__(self) -> int:
        return self.size

    def sequences(self, indices: Sequence[int]) -> torch.Tensor:
        """Token ids of the given indices: -> LongTensor (n, L)."""
        indices = [int(i) for i in indices]
        for index in indices:
            if not 0 <= index < self.size:
                raise IndexError(f"index {index} outside a synthetic split of size {self.size}")
        uniforms = counter_uniforms(self.data_seed, self.stream, indices, self.length, 2)
        return self.source.tokens_from_uniforms(uniforms)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        tokens = self.sequences(indices)
        mask = torch.ones(self.length, dtype=torch.long)
        return [{"input_ids": row, "attention_mask": mask.clone()} for row in tokens]


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def settings_problem(data_cfg: Mapping[str, Any]) -> str | None:
    """What is wrong with the ``data=synthetic`` settings that the source and its splits are
    built from, as one message naming the key; None when nothing is. Checked by the config
    (data/settings.py, from ``algo.resolve_config``) before any work, and again by the builders below."""
    if data_cfg.get("wrap"):
        return ("data.wrap must be false for data=synthetic: each example is one window of the "
                "source started from its initial distribution")
    if data_cfg.get("tokenizer_name_or_path") is not None:
        return ("data.tokenizer_name_or_path must be null for data=synthetic: the tokens are "
                "chain states with their own tokenizer")
    vocab = data_cfg.get("vocab_size")
    if not _whole(vocab) or vocab < 2:
        return f"data.vocab_size={vocab}: the source needs a whole number of tokens >= 2"
    seed = data_cfg.get("source_seed")
    if not _whole(seed) or seed < 0:
        return f"data.source_seed={seed}: the seed of the source's parameters must be >= 0"
    train = data_cfg.get("train_size")
    if train is not None and (not _whole(train) or train < 1):
        return (f"data.train_size={train}: give a number of training sequences >= 1, or null "
                "for an unbounded stream")
    valid = data_cfg.get("valid_size")
    if not _whole(valid) or valid < 1:
        return f"data.valid_size={valid}: give a number of validation sequences >= 1"
    return None


def _check_data_cfg(data_cfg: Mapping[str, Any]) -> None:
    problem = settings_problem(data_cfg)
    if problem is not None:
        raise ValueError(problem)


def make_tokenizer(data_cfg: Mapping[str, Any]) -> SyntheticTokenizer:
    """Tokenizer-like object for ``data=synthetic`` (vocab_size = data.vocab_size)."""
    _check_data_cfg(data_cfg)
    return SyntheticTokenizer(int(data_cfg["vocab_size"]))


def make_datasets(
    data_cfg: Mapping[str, Any], length: int
) -> tuple[SyntheticSequences, SyntheticSequences]:
    """(train, valid) datasets of {'input_ids': (L,), 'attention_mask': (L,) ones}.

    ``data.train_size: null`` gives an unbounded stream of ``UNBOUNDED_DATASET_LENGTH``
    indices; use a sequential sampler on it (items are i.i.d., so shuffling adds nothing).
    """
    _check_data_cfg(data_cfg)
    source = SyntheticSource.from_config(data_cfg)
    train_size = data_cfg["train_size"]
    train_size = UNBOUNDED_DATASET_LENGTH if train_size is None else int(train_size)
    seed = int(data_cfg["data_seed"])
    train = SyntheticSequences(source, length, train_size, seed, "train")
    valid = SyntheticSequences(source, length, int(data_cfg["valid_size"]), seed, "valid")
    log.info(
        "synthetic %s source: V=%d, L=%d, sequence entropy %.4f nats/token, train %d, valid %d",
        source.source_kind, source.vocab_size, length, source.sequence_entropy(length) / length,
        train_size, len(valid),
    )
    return train, valid
