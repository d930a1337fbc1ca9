"""``mode=sample_eval eval.denoiser=oracle``: the exact denoiser of ``data=synthetic*``
(models/exact_denoiser.py) sampled like a trained FLM, by the FLM sampler (models/generate.py,
docs/math.md §4)."""

from __future__ import annotations

import logging
from typing import Any

import torch

import data
from flow.registry import algorithm
from models.exact_denoiser import MAX_ORACLE_VOCAB, ORACLE, ExactDenoiser
from models.generate import generate
from runtime.config import ConfigError

log = logging.getLogger(__name__)

HYBRID = "hybrid"  # the network on eval.hybrid_band, the exact denoiser off it (evaluation/diagnostics.py)
# values of eval.denoiser: the trained network, the exact denoiser, or the two by time band
DENOISERS = ("network", ORACLE, HYBRID)


class OracleSampler(torch.nn.Module):
    """What ``evaluation/sample_eval.run_from_config`` samples when eval.denoiser=oracle:
    the exact denoiser in place of an algo=flm network."""

    spec = algorithm("flm")

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.denoiser = ExactDenoiser.from_data_config(config.data)

    @property
    def network_calls_per_step(self) -> int:
        return self.spec.network_calls_per_step

    @torch.no_grad()
    def generate(self, num_samples: int, steps: int, generator: torch.Generator | None = None,
                 state_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tokens (num_samples, model.length) from ``steps`` sampler steps."""
        sc = self.config.sampling
        return generate(self.denoiser, steps=steps, num_samples=num_samples, generator=generator,
                        two_times=self.spec.sampler_two_times,
                        length=int(self.config.model.length),
                        denominator_eps=sc.denominator_eps, state_dtype=state_dtype,
                        position_chunk=sc.position_chunk, sampler=self.spec.sampler)


def check_denoiser_choice(config: Any) -> None:
    """eval.denoiser: one of ``DENOISERS``; oracle needs data=synthetic and no checkpoint."""
    choice = config.eval.denoiser
    if choice not in DENOISERS:
        raise ConfigError(f"eval.denoiser={choice!r}; use one of {DENOISERS}")
    if choice != ORACLE:
        return
    if config.data.name != "synthetic":
        raise ConfigError(f"eval.denoiser={ORACLE} needs data=synthetic (or synthetic-hmm, "
                          f"synthetic-ladder): the exact denoiser is the source's; got "
                          f"data={config.data.name}. Use eval.denoiser=network")
    if config.eval.checkpoint_path:
        raise ConfigError(f"eval.denoiser={ORACLE} samples the exact denoiser, not the "
                          f"checkpoint eval.checkpoint_path={config.eval.checkpoint_path}: "
                          "unset it (the data config defines the source)")
    if int(config.data.vocab_size) > MAX_ORACLE_VOCAB:
        raise ConfigError(f"eval.denoiser={ORACLE}: data.vocab_size={config.data.vocab_size} "
                          f"exceeds MAX_ORACLE_VOCAB={MAX_ORACLE_VOCAB} "
                          "(models/exact_denoiser.py)")


def oracle_sampling_module(config: Any) -> tuple[OracleSampler, Any]:
    """(sampler module on the GPU when there is one, data tokenizer) for eval.denoiser=oracle;
    model.length from the current config."""
    check_denoiser_choice(config)
    tokenizer = data.get_tokenizer(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("sample_eval with the exact denoiser of the %s source (Euler sampler)",
             config.data.source_kind)
    return OracleSampler(config).to(device).eval(), tokenizer
