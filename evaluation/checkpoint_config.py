"""Evaluation and generation take what the checkpoint knows.

A checkpoint of this project stores the run's resolved config (``hyper_parameters.config``,
checkpointing.py). ``mode=generate|sample_eval|ppl_eval eval.checkpoint_path=<ckpt>`` therefore
needs nothing else: the algorithm, model, data (its tokenizer included) and the training
settings that define the objective (``OBJECTIVE_TRAINING_KEYS``) come from the checkpoint
(``adopt_checkpoint_config``), the run directory is named after the checkpoint's data and
algorithm (the ``checkpoint_run_name`` resolver in configs/config.yaml) and the start-up log
says them. A command-line value that contradicts the checkpoint is one ConfigError; values that
say where things are on this machine (``LOCAL_KEYS``, the teacher paths) may be given.

Checkpoints of the paper's code and Hub folders carry no config of ours: for them the
command line's config stands and models/load.py builds the nodes (``config_nodes``).
"""

from __future__ import annotations

import functools
import logging
import pickle
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from flow.registry import TEACHER_KEYS
from runtime.config import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_MODES = ("ppl_eval", "sample_eval", "generate")
ADOPTED_NODES = ("algo", "model", "data")
# training.* keys that define what the model computes (the loss's time range, its weighting)
OBJECTIVE_TRAINING_KEYS = ("t_min", "t_max", "loss_weight_width", "antithetic_sampling", "ema")
# where the data and tokenizer are on this machine: the command line may set them
LOCAL_KEYS = ("data.cache_dir", "data.num_proc", "data.tokenizer_name_or_path")
CACHE_KEY = "data.cache_dir"  # every data config defaults it to $DATA_DIR or ./data_cache
GROUPS = ("algo", "model", "data")


@functools.lru_cache(maxsize=4)
def _read_saved(path: str, mtime_ns: int) -> DictConfig | None:
    try:  # mmap: the tensors are not read, only the pickled header
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except (OSError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError):
        return None  # not a zip-format torch file: models/load.py classifies and reports it
    hyper = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    saved = (hyper or {}).get("config")
    if not isinstance(saved, dict) or not all(node in saved for node in ADOPTED_NODES):
        return None  # a paper checkpoint (its own config schema) or a bare state dict
    return OmegaConf.create(saved)


def saved_config(path: str | Path | None) -> DictConfig | None:
    """The config a checkpoint of this project stores; None for anything else (a missing
    file, a Hub folder or id, a checkpoint of the paper's code): load_for_eval reads and
    reports those."""
    if not path:
        return None
    file = Path(str(path)).expanduser()
    if not file.is_file():
        return None
    return _read_saved(str(file.resolve()), file.stat().st_mtime_ns)


def uses_checkpoint(config: DictConfig) -> bool:
    """Whether this mode reads ``eval.checkpoint_path`` (sample_eval's oracle denoiser does not)."""
    if config.mode not in CHECKPOINT_MODES or not config.eval.checkpoint_path:
        return False
    return not (config.mode == "sample_eval" and config.eval.get("denoiser") == "oracle")


def checkpoint_run_name(mode: str, checkpoint_path: str | None, data_name: str,
                        algo_name: str) -> str:
    """``<data>/<algo>`` for the run directory: the checkpoint's in the checkpoint modes."""
    if mode in CHECKPOINT_MODES:
        saved = saved_config(checkpoint_path)
        if saved is not None:
            return f"{saved.data.name}/{saved.algo.name}"
    return f"{data_name}/{algo_name}"


def register_resolvers() -> None:
    """Register ``checkpoint_run_name`` (hydra.run.dir in configs/config.yaml) with OmegaConf;
    every entry point that composes configs/config.yaml calls this before Hydra starts."""
    OmegaConf.register_new_resolver("checkpoint_run_name", checkpoint_run_name, replace=True)


def _override_key(override: str) -> tuple[str, str] | None:
    """``key, value`` of a command-line override (``+``/``++`` prefixes dropped); None for a
    deletion (``~key``) or a Hydra setting."""
    text = override.lstrip("+")
    if text.startswith("~") or "=" not in text:
        return None
    key, value = text.split("=", 1)
    return None if key.startswith("hydra") else (key, value)


def _objective_key(key: str) -> bool:
    node, _, rest = key.partition(".")
    if node in ADOPTED_NODES and rest:
        return key not in LOCAL_KEYS and not (node == "algo" and rest in TEACHER_KEYS)
    return node == "training" and rest in OBJECTIVE_TRAINING_KEYS


def check_command_line(config: DictConfig, saved: DictConfig, overrides: list[str],
                       path: str) -> None:
    """ConfigError for the first command-line override whose value differs from the
    checkpoint's: a group choice (``algo=``, ``model=``, ``data=``) compared by the node's
    ``name``, a ``algo.*``/``model.*``/``data.*``/objective ``training.*`` key by value."""
    for override in overrides:
        parsed = _override_key(override)
        if parsed is None:
            continue
        key, _ = parsed
        if key in GROUPS:
            given, stored, shown = config[key].name, saved[key].name, f"{key}.name"
        elif _objective_key(key):
            given = OmegaConf.select(config, key, default=None)
            stored = OmegaConf.select(saved, key, default=None)
            shown = key
        else:
            continue
        if given != stored:
            raise ConfigError(
                f"{override} contradicts eval.checkpoint_path={path}, trained with "
                f"{shown}={stored}: drop {override} (the checkpoint's algo, model and data are "
                "used), or point eval.checkpoint_path to a checkpoint trained with it")


def adopt_checkpoint_config(config: DictConfig, overrides: list[str]) -> DictConfig:
    """The config with the checkpoint's algo, model and data nodes and objective training keys
    (``config`` itself when the mode reads no checkpoint of this project); ``overrides``: the
    command line (Hydra's task overrides), checked by ``check_command_line``."""
    if not uses_checkpoint(config):
        return config
    path = str(config.eval.checkpoint_path)
    saved = saved_config(path)
    if saved is None:
        return config
    check_command_line(config, saved, overrides, path)
    merged = config.copy()
    with open_dict(merged):
        for node in ADOPTED_NODES:
            merged[node] = saved[node]
        for key in OBJECTIVE_TRAINING_KEYS:
            if key in saved.get("training", {}):
                merged.training[key] = saved.training[key]
        given = {key for key, _ in filter(None, map(_override_key, overrides))}
        for key in (CACHE_KEY, *sorted(given & set(LOCAL_KEYS))):  # this machine's paths
            value = OmegaConf.select(config, key, default=None)
            if value is not None and OmegaConf.select(merged, key, default=None) is not None:
                OmegaConf.update(merged, key, value)
        for key in TEACHER_KEYS:  # teachers may have moved since training
            if config.algo.get(key) and key in merged.algo:
                merged.algo[key] = config.algo[key]
    if saved.algo.name != config.algo.name or saved.data.name != config.data.name:
        log.info("algo=%s, model=%s, data=%s from %s", saved.algo.name, saved.model.name,
                 saved.data.name, path)
    return merged
