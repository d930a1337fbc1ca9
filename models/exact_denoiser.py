"""Bayes-optimal FLM denoiser of the synthetic source (``eval.denoiser=oracle``,
``algo.teacher_path=oracle``, the validation gap ``val/gap``).

FLM corrupts a sequence as ``x_γ = (1 - γ)·ε + γ·e(x)`` per position (docs/math.md §1), so
given the clean sequence the observations ``z_i = x_γ[i]`` are independent with
``z_i ~ N(γ·e(x_i), (1 - γ)² I_V)``. Up to a term constant in the token ``v``, the
observation log-likelihood of position ``i`` under ``x_i = v`` is

    ℓ_i(v) = γ·z_i[v] / (1 - γ)²

(expand ``-||z_i - γ e_v||² / (2 (1 - γ)²)``: ``||z_i||²`` and ``γ²`` do not depend on v).
For the Markov source (tokens are chain states) the exact posterior marginals
``p(x_i = v | x_γ)`` are forward-backward with these emissions; for the HMM the hidden
chain runs forward-backward with the emission ``log Σ_v E[h, v]·exp ℓ_i(v)`` and the token
posterior is ``Σ_h q_i(h)·E[h, v]·exp ℓ_i(v) / Σ_v' E[h, v']·exp ℓ_i(v')``. Everything is
float64 and in log space over the source's sparse (S, k) rows, batched over sequences.

``ExactDenoiser`` exposes the network interface of the samplers (flow/sampling.py) and the
distillation losses (flow/flow_map.py): an identity ``input_embedding`` (V, V) (so the
D-space state is the V-space state), ``features(h, t, t2)`` (the whole forward-backward:
every position's posterior depends on every observation) and ``head(hidden, c)`` (a slice
of the posterior log-probabilities, callable per chunk of positions). An identity
embedding costs (B, L, V) states: fine for V up to a few hundred.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data.synthetic import SyntheticSource
from flow.schedule import AlphaGammaTable

log = logging.getLogger(__name__)

ORACLE = "oracle"  # the config value that selects the exact denoiser (eval.denoiser, teachers)
LOG_PROB_FLOOR = -1.0e4  # posterior log-probabilities are clamped here (exp underflows to 0)
MIN_NOISE_SCALE = 1.0e-6  # 1 - γ is clamped below here: at γ = 1 the likelihood is a delta
MAX_ORACLE_VOCAB = 4096  # identity embeddings (V, V) and (B, L, V) states beyond this are unwise
GAP_TIME_BINS = 10  # val/gap_bin0..9: the gap per tenth of the model time t in [0, 1]


def observation_log_likelihood(z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """ℓ(v) = γ·z[v] / (1 - γ)², up to a constant per position: z (B, L, V), γ (B,) ->
    float64 (B, L, V)."""
    gamma = gamma.to(torch.float64)[:, None, None]
    scale = gamma / (1.0 - gamma).clamp_min(MIN_NOISE_SCALE) ** 2
    return scale * z.to(torch.float64)


def inverse_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """Padded inverse lists of a map n -> index[n] in [0, size): (N,) -> (size, m) long,
    row c holding every n with index[n] = c, padded with N (m = the largest count)."""
    count = index.numel()
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=size)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(count) - starts[index[order]]
    out = torch.full((size, max(int(counts.max()), 1)), count, dtype=torch.long)
    out[index[order], rank] = order
    return out


def gathered_logsumexp(values: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """out[..., c] = logsumexp of values[..., n] over the n of row c of ``inverse``
    (``inverse_index``): (..., N) -> (..., size); -inf where a row is all padding."""
    pad = torch.full((*values.shape[:-1], 1), -math.inf, dtype=values.dtype,
                     device=values.device)
    return torch.logsumexp(torch.cat([values, pad], dim=-1)[..., inverse], dim=-1)


def chain_posteriors(log_obs: torch.Tensor, log_initial: torch.Tensor, successors: torch.Tensor,
                     log_successor_probs: torch.Tensor, predecessors: torch.Tensor,
                     ) -> torch.Tensor:
    """Forward-backward on a Markov chain with sparse rows, in log space.

    log_obs (B, L, S): log-likelihood of each position's observation per state;
    log_initial (S,); successors, log_successor_probs (S, k); predecessors: the
    ``inverse_index`` (S, m) of the flattened successors. Returns the normalised
    log p(state_i = s | all observations), float64 (B, L, S). Every sum is a logsumexp
    (exact for any spread of the log-likelihoods, e.g. γ near 1 at off-source states).
    """
    length, states = log_obs.shape[1], log_obs.shape[2]
    dense = successors.shape[1] == states  # full rows, sorted: log_successor_probs is log P
    forward = [log_initial[None] + log_obs[:, 0]]
    for i in range(1, length):
        moved = forward[-1][:, :, None] + log_successor_probs[None]  # (B, S, k)
        summed = (torch.logsumexp(moved, dim=1) if dense
                  else gathered_logsumexp(moved.flatten(1), predecessors))
        forward.append(summed + log_obs[:, i])
    backward = [torch.zeros_like(forward[0])]
    for i in range(length - 2, -1, -1):
        ahead = log_obs[:, i + 1] + backward[-1]  # (B, S)
        ahead = ahead[:, None, :] if dense else ahead[:, successors]  # (B, S or 1, k)
        backward.append(torch.logsumexp(ahead + log_successor_probs[None], dim=-1))
    backward.reverse()
    joint = torch.stack(forward, 1) + torch.stack(backward, 1)  # (B, L, S)
    return joint - torch.logsumexp(joint, dim=-1, keepdim=True)


class ExactDenoiser(torch.nn.Module):
    """p(x_i = v | x_γ) of a ``SyntheticSource`` as logits, with the samplers' interface.

    ``forward(h, t)`` / ``features`` + ``head``: h (B, L, V) (the identity embedding makes
    h = x_γ), t (B,) model time (α; γ = γ(t) by flow/schedule.py) -> float64 (B, L, V)
    normalised log-probabilities (clamped below at ``LOG_PROB_FLOOR``).
    """

    is_oracle = True  # checked by models/teacher.py (no weights to copy into a student)

    def __init__(self, source: SyntheticSource) -> None:
        super().__init__()
        vocab = source.vocab_size
        if vocab > MAX_ORACLE_VOCAB:
            raise ValueError(f"the exact denoiser keeps (B, L, V) states and a (V, V) identity "
                             f"embedding; data.vocab_size={vocab} exceeds MAX_ORACLE_VOCAB="
                             f"{MAX_ORACLE_VOCAB} (models/exact_denoiser.py): use a smaller source")
        self.vocab_size = vocab
        self.source_kind = source.source_kind
        self.input_embedding = torch.nn.Parameter(torch.eye(vocab, dtype=torch.float64),
                                                  requires_grad=False)
        self.register_buffer("successors", torch.from_numpy(source.successors))
        self.register_buffer("log_successor_probs",
                             torch.from_numpy(_log(source.successor_probs)))
        self.register_buffer("log_initial", torch.from_numpy(_log(source.initial_np)))
        self.register_buffer("predecessors", inverse_index(self.successors.reshape(-1),
                                                           source.num_states))
        if source.source_kind == "hmm":
            self.register_buffer("emission_tokens", torch.from_numpy(source.emission_tokens))
            self.register_buffer("log_emission_probs",
                                 torch.from_numpy(_log(source.emission_probs)))
            self.register_buffer("emitters", inverse_index(self.emission_tokens.reshape(-1),
                                                           vocab))
        self.table = AlphaGammaTable(vocab)

    @classmethod
    def from_data_config(cls, data_cfg: Mapping[str, Any]) -> ExactDenoiser:
        """The exact denoiser of the source ``data=synthetic*`` describes."""
        return cls(SyntheticSource.from_config(data_cfg))

    # ---- the posterior --------------------------------------------------------------
    def log_posterior(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p(x_i = v | x_γ = z): z (B, L, V), t (B,) -> float64 (B, L, V)."""
        gamma = self.table.to(z.device).gamma_of_alpha(t.to(torch.float64))
        obs = observation_log_likelihood(z, gamma)  # (B, L, V)
        if self.source_kind == "markov":
            post = chain_posteriors(obs, self.log_initial, self.successors,
                                    self.log_successor_probs, self.predecessors)
        else:
            # per hidden state and emitted token: log E[h, v] + ℓ(v): (B, L, H, m)
            joint = self.log_emission_probs + obs[..., self.emission_tokens]
            hidden_obs = torch.logsumexp(joint, dim=-1)  # (B, L, H)
            hidden_post = chain_posteriors(hidden_obs, self.log_initial, self.successors,
                                           self.log_successor_probs, self.predecessors)
            weights = hidden_post[..., None] + joint - hidden_obs[..., None]  # (B, L, H, m)
            post = gathered_logsumexp(weights.flatten(-2), self.emitters)  # (B, L, V)
        return post.clamp_min(LOG_PROB_FLOOR)

    # ---- the network interface (flow/sampling.py, flow/flow_map.py) -----------------
    def features(self, h: torch.Tensor, t: torch.Tensor, t2: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, None]:
        """(B, L, V) state -> its posterior log-probabilities (B, L, V), no conditioning."""
        if t2 is not None:
            raise ValueError("the exact denoiser is an FLM denoiser (one time): it cannot be "
                             "a two-time flow map (FMLM student or stage-1 map)")
        with torch.autocast(device_type=h.device.type, enabled=False):  # float64 throughout
            return self.log_posterior(h, t), None

    def head(self, hidden: torch.Tensor, c: None) -> torch.Tensor:
        """The posterior log-probabilities of a chunk of positions, unchanged."""
        return hidden

    def forward(self, h: torch.Tensor | Callable[[ExactDenoiser], torch.Tensor], t: torch.Tensor,
                t2: torch.Tensor | None = None) -> torch.Tensor:
        if callable(h):
            h = h(self)
        hidden, c = self.features(h, t, t2)
        return self.head(hidden, c)

    def logits(self, h: torch.Tensor, t: torch.Tensor, t2: torch.Tensor | None = None,
               ) -> torch.Tensor:
        """``forward`` on a state taken to float64."""
        return self(h.to(torch.float64), t, t2)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """v @ I = v."""
        return v

    def denoised(self, hidden: torch.Tensor, c: None, project: bool = True,
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(softmax of the posterior log-probabilities (the state's p @ I), their argmax)."""
        return (torch.softmax(hidden, dim=-1) if project else None), hidden.argmax(dim=-1)

    def embed_state(self, z: torch.Tensor) -> torch.Tensor:
        """z @ I = z (float64): (B, L, V) -> (B, L, V)."""
        return z.to(torch.float64)

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """e(x) @ I = one-hot: (B, L) -> float64 (B, L, V)."""
        return F.one_hot(x, self.vocab_size).to(torch.float64)

    def compile(self, *args, **kwargs) -> None:
        """No-op: the forward-backward loops gain nothing from torch.compile."""
        log.info("the exact denoiser is not compiled")


def _log(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(values)


# --------------------------------------------------------------------------------------
# The training gap: model cross-entropy minus the Bayes-optimal one (val/gap)


def gap_denoiser(data_cfg: Mapping[str, Any]) -> ExactDenoiser | None:
    """The exact denoiser behind val/gap, or None (logged) when the vocabulary is too large
    for its (B, L, V) states."""
    if int(data_cfg["vocab_size"]) > MAX_ORACLE_VOCAB:
        log.warning("val/gap is not logged: data.vocab_size=%s exceeds MAX_ORACLE_VOCAB=%d "
                    "(models/exact_denoiser.py)", data_cfg["vocab_size"], MAX_ORACLE_VOCAB)
        return None
    return ExactDenoiser.from_data_config(data_cfg)


def gap_metrics(backbone: torch.nn.Module, oracle: ExactDenoiser, tokens: torch.Tensor,
                t: torch.Tensor, gamma: torch.Tensor, generator: torch.Generator | None,
                ) -> dict[str, tuple[torch.Tensor, int]]:
    """Per-token cross-entropy of ``backbone`` minus that of the exact denoiser, on one shared
    draw of x_γ = (1 - γ)ε + γ e(x) (materialised: (B, L, V)).

    tokens (B, L), t and γ (B,) -> {"val/gap": (mean, n sequences), "val/gap_bin<k>": ...
    for each of the ``GAP_TIME_BINS`` bins of t (count 0, value 0 when empty)}, plus
    "val/ce_model" and "val/ce_bayes". The backbone sees ``embed_state(x_γ)``; every
    position counts (the synthetic source has no padding).
    """
    vocab = oracle.vocab_size
    eps = torch.randn(*tokens.shape, vocab, generator=generator, device=tokens.device)
    g = gamma.float()[:, None, None]
    z = (1 - g) * eps + g * F.one_hot(tokens, vocab).float()
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        h = backbone.embed_state(z)
    model_ce = F.cross_entropy(backbone(h, t).float().flatten(0, 1), tokens.flatten(),
                               reduction="none").view_as(tokens).double().mean(1)  # (B,)
    oracle_logp = oracle.to(tokens.device)(z, t)
    bayes_ce = -oracle_logp.gather(-1, tokens[..., None])[..., 0].mean(1)  # (B,)
    gap = model_ce - bayes_ce
    out = {"val/gap": (gap.mean(), gap.numel()), "val/ce_model": (model_ce.mean(), gap.numel()),
           "val/ce_bayes": (bayes_ce.mean(), gap.numel())}
    bins = (t.double() * GAP_TIME_BINS).long().clamp(0, GAP_TIME_BINS - 1)
    for k in range(GAP_TIME_BINS):
        # every bin every batch (the same keys on every rank for sync_dist); an empty bin
        # weighs 0 in Lightning's batch-size-weighted mean
        members = bins == k
        count = int(members.sum())
        value = gap[members].mean() if count else gap.new_zeros(())
        out[f"val/gap_bin{k}"] = (value, count)
    return out
