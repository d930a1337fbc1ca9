"""Where FLM's sampling error comes from, on data with an exact denoiser (data=synthetic).

Two tools (docs/math.md §12), both network wrappers, so no sampler is edited:

* ``eval.diagnose=true``: per sampling-step count N, KL(exact || model) per tenth of the
  model time t, averaged over samples and positions: ``trajectory_kl`` on the states the
  Euler sampler itself visits (``TrajectoryKL`` sees every (z, t) the sampler evaluates),
  ``data_kl`` on states drawn from the data path ``z = (1 - γ)ε + γ e(x)``, x from the source,
  at the same grid times t_i = i/N (i < N). On data states the KL is the validation gap of
  that bin in expectation (val/gap_bin<k>); a trajectory KL above it means the sampler's own
  errors moved it where the network is worse: errors compound.
* ``eval.denoiser=hybrid`` with ``eval.hybrid_band=[lo, hi]``: the network answers the
  calls at lo <= t < hi, the exact denoiser the others (``HybridNetwork``); [0, 1) is the
  network sampler, [1, 1) the exact one. Comparing bands says which t range costs most.

Both run the Euler sampler on the V-space state z (the samplers' identity-embedding case,
flow/sampling.py): the exact denoiser reads z, the network reads ``z @ E``, the same
network input as the D-space sampler's.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from algo.oracle import HYBRID, check_denoiser_choice
from data.synthetic import SyntheticSource
from evaluation.network_wrappers import prediction_network_slot, swapped_prediction_network
from flow.flow_map import softmax_wide
from flow.sampling import initial_state, sample_euler, step_grid
from models.exact_denoiser import ORACLE, ExactDenoiser
from runtime.config import ConfigError

logger = logging.getLogger(__name__)

TIME_BINS = 10  # trajectory_kl / data_kl: one value per tenth of t
DiagnoseFn = Callable[[int], dict[str, Any]]  # steps -> {"trajectory_kl": [...], "data_kl": [...]}


def time_bin(t: float) -> int:
    """The tenth of [0, 1] that t falls in (t = 1 in the last)."""
    return min(int(t * TIME_BINS), TIME_BINS - 1)


def _uniform_time(t: torch.Tensor) -> float:
    """The one time of a sampler call (the samplers pass t expanded over the batch)."""
    value = float(t[0])
    if bool((t != t[0]).any()):
        raise ValueError("a diagnostic wrapper routes whole calls by t: every sequence of a "
                         "call must share one time (as in the samplers)")
    return value


def network_logits(network: torch.nn.Module, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A network's logits over V for the V-space state z: (B, L, V), t (B,) -> (B, L, V)."""
    dtype = network.input_embedding.dtype
    hidden, c = network.features(network.embed_state(z.to(dtype)), t)
    return network.head(hidden, c)


def kl_exact_model(exact_log_probs: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """KL(exact || model) per position, float64: (B, L, V) log-probs, (B, L, V) logits ->
    (B, L). Positions where the exact probability is 0 contribute 0."""
    log_q = torch.log_softmax(model_logits.to(torch.float64), dim=-1)
    p = exact_log_probs.exp()
    return (p * (exact_log_probs - log_q)).sum(-1)


class StateSpaceNetwork(torch.nn.Module):
    """A network on the V-space state: identity ``input_embedding`` (V, V) in the exact
    denoiser's float64, ``features(z, t, t2)`` = the network's features of ``z @ E``, its head
    unpadded (over V). A sampler driving it evolves z, the network sees what it would see
    from the D-space sampler."""

    def __init__(self, network: torch.nn.Module, identity: torch.Tensor) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("input_embedding", identity, persistent=False)

    def features(self, z: torch.Tensor, t: torch.Tensor, t2: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, Any]:
        return self.network.features(self.network.embed_state(
            z.to(self.network.input_embedding.dtype)), t, t2)

    def head(self, hidden: torch.Tensor, c: Any) -> torch.Tensor:
        return self.network.head(hidden, c)

    def denoised(self, hidden: torch.Tensor, c: Any, project: bool = True,
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(softmax(f) @ I = softmax(f) over V, argmax f) for the sampler, f the network's
        logits; the softmax in float32 (float64 for a float64 network), as DiT.denoised."""
        logits = self.head(hidden, c)
        tokens = logits.argmax(dim=-1)
        if not project:
            return None, tokens
        return softmax_wide(logits), tokens


class HybridNetwork(torch.nn.Module):
    """The network on the V-space state (``StateSpaceNetwork``) for calls at lo <= t < hi,
    the exact denoiser for the others; t as the sampler passes it. ``features`` tags its
    conditioning with the route so that ``head`` follows it."""

    def __init__(self, network: torch.nn.Module, exact: ExactDenoiser,
                 band: tuple[float, float]) -> None:
        super().__init__()
        self.network = StateSpaceNetwork(network, exact.input_embedding.detach())
        self.exact = exact
        self.band = (float(band[0]), float(band[1]))
        self.input_embedding = self.network.input_embedding

    def in_band(self, t: torch.Tensor) -> bool:
        lo, hi = self.band
        return lo <= _uniform_time(t) < hi

    def features(self, z: torch.Tensor, t: torch.Tensor, t2: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, tuple[str, Any]]:
        if self.in_band(t):
            hidden, c = self.network.features(z, t, t2)
            return hidden, ("network", c)
        hidden, c = self.exact.features(z, t, t2)
        return hidden, (ORACLE, c)

    def head(self, hidden: torch.Tensor, c: tuple[str, Any]) -> torch.Tensor:
        route, inner = c
        return (self.network if route == "network" else self.exact).head(hidden, inner)

    def denoised(self, hidden: torch.Tensor, c: tuple[str, Any], project: bool = True,
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
        route, inner = c
        return (self.network if route == "network" else self.exact).denoised(hidden, inner,
                                                                             project)


class TrajectoryKL(torch.nn.Module):
    """Drives a sampler with ``driver`` (a V-space network: ``StateSpaceNetwork`` or
    ``HybridNetwork``) and, at every call, adds KL(exact || ``network``) of the state it is
    called on to the call's tenth of t (``kl_per_bin``). Twice the calls of the driver."""

    def __init__(self, driver: torch.nn.Module, network: torch.nn.Module,
                 exact: ExactDenoiser) -> None:
        super().__init__()
        self.driver, self.network, self.exact = driver, network, exact
        self.input_embedding = driver.input_embedding
        self.sums = [0.0] * TIME_BINS
        self.counts = [0] * TIME_BINS

    def features(self, z: torch.Tensor, t: torch.Tensor, t2: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, Any]:
        kl = kl_exact_model(self.exact.log_posterior(z, t), network_logits(self.network, z, t))
        k = time_bin(_uniform_time(t))
        self.sums[k] += float(kl.sum())
        self.counts[k] += kl.numel()
        return self.driver.features(z, t, t2)

    def head(self, hidden: torch.Tensor, c: Any) -> torch.Tensor:
        return self.driver.head(hidden, c)

    def denoised(self, hidden: torch.Tensor, c: Any, project: bool = True,
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
        return self.driver.denoised(hidden, c, project)

    def kl_per_bin(self) -> list[float | None]:
        """Mean KL per tenth of t (nats per position); None for a tenth no call fell in."""
        return [s / n if n else None for s, n in zip(self.sums, self.counts)]


def as_state_space(network: torch.nn.Module, exact: ExactDenoiser) -> torch.nn.Module:
    """A sampler's network on the V-space state: a ``HybridNetwork`` already is one."""
    if isinstance(network, HybridNetwork):
        return network
    return StateSpaceNetwork(network, exact.input_embedding.detach())


@torch.no_grad()
def trajectory_kl(driver: torch.nn.Module, network: torch.nn.Module, exact: ExactDenoiser,
                  steps: int, noise: torch.Tensor, denominator_eps: float,
                  ) -> list[float | None]:
    """``trajectory_kl`` of one Euler run of ``steps`` steps from the V-space ``noise``
    (B, L, V) driven by ``driver`` (V-space): KL(exact || network) per tenth of t."""
    recorder = TrajectoryKL(driver, network, exact)
    sample_euler(recorder, exact.table, noise, steps, denominator_eps,
                 position_chunk=noise.shape[1])
    return recorder.kl_per_bin()


@torch.no_grad()
def data_kl(network: torch.nn.Module, exact: ExactDenoiser, tokens: torch.Tensor, steps: int,
            generator: torch.Generator | None) -> list[float | None]:
    """KL(exact || network) per tenth of t on data-path states at the grid times t_i = i/N
    (i < N) of an N-step sampler: tokens (B, L) from the source, one fresh ε per time."""
    vocab = exact.vocab_size
    t_grid, gamma = step_grid(exact.table, steps, tokens.device)
    one_hot = F.one_hot(tokens, vocab).to(torch.float64)
    sums, counts = [0.0] * TIME_BINS, [0] * TIME_BINS
    for i in range(steps):
        eps = torch.randn(*tokens.shape, vocab, generator=generator, device=tokens.device,
                          dtype=torch.float64)
        z = (1 - gamma[i]) * eps + gamma[i] * one_hot
        t = t_grid[i].float().expand(tokens.shape[0])
        kl = kl_exact_model(exact.log_posterior(z, t), network_logits(network, z, t))
        k = time_bin(float(t[0]))
        sums[k] += float(kl.sum())
        counts[k] += kl.numel()
    return [s / n if n else None for s, n in zip(sums, counts)]


# ---- config: eval.diagnose, eval.denoiser=hybrid -------------------------------------------
def check_config(config: Any) -> None:
    """eval.denoiser (network | oracle | hybrid), eval.hybrid_band and eval.diagnose, before
    any work: the hybrid and the diagnostics need data=synthetic and a trained FLM."""
    ev = config.eval
    check_denoiser_choice(config)
    if ev.denoiser == HYBRID or ev.diagnose:
        what = "eval.denoiser=hybrid" if ev.denoiser == HYBRID else "eval.diagnose=true"
        if config.data.name != "synthetic":
            raise ConfigError(f"{what} needs data=synthetic (the exact denoiser is the "
                              f"source's); got data={config.data.name}")
        if config.algo.name != "flm" or ev.denoiser == ORACLE:
            raise ConfigError(f"{what} compares a trained FLM (algo=flm, eval.denoiser="
                              f"network or hybrid) with the exact denoiser; got algo="
                              f"{config.algo.name}, eval.denoiser={ev.denoiser}")
    if ev.denoiser == HYBRID:
        band = ev.hybrid_band
        if band is None or len(band) != 2 or not 0.0 <= float(band[0]) <= float(band[1]) <= 1.0:
            raise ConfigError(f"eval.hybrid_band={band}: give [lo, hi] with 0 <= lo <= hi <= 1 "
                              "(the network answers at lo <= t < hi)")
    if ev.diagnose and int(ev.diagnose_samples) < 1:
        raise ConfigError(f"eval.diagnose_samples={ev.diagnose_samples}; must be >= 1")


def hybrid_context(config: Any, module: Any) -> contextlib.AbstractContextManager:
    """With eval.denoiser=hybrid: a context in which ``module`` samples with the
    ``HybridNetwork`` of its network and eval.hybrid_band; a no-op otherwise."""
    if config.eval.denoiser != HYBRID:
        return contextlib.nullcontext()
    container, key = prediction_network_slot(module)
    exact = ExactDenoiser.from_data_config(config.data).to(container[key].input_embedding.device)
    band = tuple(config.eval.hybrid_band)
    logger.info("eval.denoiser=hybrid: the network at %g <= t < %g, the exact denoiser "
                "elsewhere", *band)
    return swapped_prediction_network(module, lambda net: HybridNetwork(net, exact, band))


def setup_from_config(config: Any, module: Any) -> DiagnoseFn | None:
    """The ``diagnose_fn`` of ``run_sample_eval`` for eval.diagnose=true (None otherwise).

    Each call draws eval.diagnose_samples sequences (sampling.batch_size at a time) from
    generators seeded with eval.seed, runs the module's current sampling network (the
    hybrid under eval.denoiser=hybrid) on the V-space state and returns
    {"trajectory_kl": 10 values, "data_kl": 10 values} (None where no grid time falls)."""
    check_config(config)
    if not config.eval.diagnose:
        return None
    container, key = prediction_network_slot(module)
    network = container[key]  # the trained FLM, read before any hybrid is put in its place
    device = network.input_embedding.device
    exact = ExactDenoiser.from_data_config(config.data).to(device)
    source = SyntheticSource.from_config(config.data)
    n, seed = int(config.eval.diagnose_samples), int(config.eval.seed)
    batch, length = int(config.sampling.batch_size), int(config.model.length)
    eps = float(config.sampling.denominator_eps)

    def diagnose(steps: int) -> dict[str, Any]:
        driver = as_state_space(container[key], exact)
        generator = torch.Generator(device=device).manual_seed(seed)
        data_generator = torch.Generator().manual_seed(seed)
        trajectory, on_data = _BinMeans(), _BinMeans()
        for start in range(0, n, batch):
            size = min(batch, n - start)
            noise = initial_state(exact, size, length, generator, dtype=torch.float64)
            trajectory.add(trajectory_kl(driver, network, exact, steps, noise, eps), size)
            tokens = source.sample(size, length, data_generator).to(device)
            on_data.add(data_kl(network, exact, tokens, steps, generator), size)
        out = {"trajectory_kl": trajectory.means(), "data_kl": on_data.means()}
        logger.info("diagnose steps=%d trajectory_kl=%s data_kl=%s", steps,
                    _fmt(out["trajectory_kl"]), _fmt(out["data_kl"]))
        return out
    return diagnose


class _BinMeans:
    """Per-bin means over batches of equal weight per sequence (every bin sees the same
    number of calls per sequence, so sequence counts weigh the batch means)."""

    def __init__(self) -> None:
        self.sums, self.counts = [0.0] * TIME_BINS, [0] * TIME_BINS

    def add(self, values: list[float | None], weight: int) -> None:
        for k, value in enumerate(values):
            if value is not None:
                self.sums[k] += value * weight
                self.counts[k] += weight

    def means(self) -> list[float | None]:
        return [s / c if c else None for s, c in zip(self.sums, self.counts)]


def _fmt(values: list[float | None]) -> str:
    return "[" + ", ".join("-" if v is None or not math.isfinite(v) else f"{v:.4f}"
                           for v in values) + "]"
