"""The data settings a run checks before any work: ``model.length`` against the data, and the
synthetic source's own keys (``data/synthetic.py``)."""

from __future__ import annotations

from omegaconf import DictConfig

from data import synthetic
from data.packing import MIN_BLOCK_LENGTH
from runtime.config import ConfigError


def check_settings(config: DictConfig) -> None:
    """model.length for the data (text blocks are [BOS] content [EOS]) and the synthetic
    source's settings (data/synthetic.py), before any work."""
    length = config.model.length
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ConfigError(f"model.length={length}: give the sequence length in tokens, >= 1")
    if config.data.name == "synthetic":
        problem = synthetic.settings_problem(config.data)
        if problem is not None:
            raise ConfigError(problem)
    elif length < MIN_BLOCK_LENGTH:
        raise ConfigError(f"model.length={length}: a block of text data={config.data.name} is "
                          f"[BOS] content [EOS]; use model.length >= {MIN_BLOCK_LENGTH}")
