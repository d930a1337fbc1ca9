"""The whole config check of a run, before any work: the run's settings (runtime/config.py),
the data's (data/settings.py), the algorithm's own (its entry in flow/registry.py) and where its teachers are."""

from __future__ import annotations

from omegaconf import DictConfig

from data.settings import check_settings as check_data_settings
from flow.registry import algorithm
from models.teacher import check_teacher_locations
from runtime.config import resolve_config as resolve_run_config


def resolve_config(config: DictConfig) -> DictConfig:
    """``runtime.config.resolve_config`` (batch sizes, devices, reliability, ...), then the
    checks of ``algo=<name>`` and its teacher paths; ConfigError naming the key."""
    config = resolve_run_config(config)
    check_data_settings(config)
    algorithm(config.algo.name).check(config)
    check_teacher_locations(config)
    return config
