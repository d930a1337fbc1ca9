"""The test session's environment, set once for every test and every ``python -m main`` a test
starts (subprocesses inherit it): no test reaches the Hugging Face Hub or wandb. Set at import,
before any test module imports ``huggingface_hub`` / ``datasets``, which read it then. Tests
that check an offline error path still set it themselves: that is their condition, not ours.

Tests marked ``cuda`` are skipped without a CUDA device (``pytest -m cuda`` selects them on a
GPU machine: bench/gpu_round.sh). Shared configs live in ``tests/helpers.py``, the plain V-space
oracles in ``tests/oracles.py``.
"""

import os

import pytest
import torch

SESSION_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
for _key, _value in SESSION_ENV.items():
    os.environ.setdefault(_key, _value)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped on a machine without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (the cuda marker)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
