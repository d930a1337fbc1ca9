"""The test session's environment, set once for every test and every ``python -m main`` a test
starts (subprocesses inherit it): no test reaches the Hugging Face Hub or wandb. Set at import,
before any test module imports ``huggingface_hub`` / ``datasets``, which read it then. Tests
that check an offline error path still set it themselves: that is their condition, not ours.

Shared configs and reference computations live in ``tests/helpers.py`` (importable).
"""

import os

SESSION_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
for _key, _value in SESSION_ENV.items():
    os.environ.setdefault(_key, _value)
