"""Build the tokenised cache of a dataset once (needs the Hugging Face Hub), e.g.

    python scripts/prepare_data.py data=lm1b-wrap model.length=128
    python scripts/prepare_data.py data=openwebtext-split model.length=1024

It composes the same Hydra config as main.py, so the cache lands where training looks for it
(``data.cache_dir``, default ``$DATA_DIR`` or ./data_cache). It logs documents tokenised per
second and an ETA while it works, saves a Hub tokenizer under ``<cache_dir>/tokenizers/`` (so
offline machines find it there), and ends with the documents, blocks and tokens of each split,
read from the manifests ``<split cache>.json`` that training checks before it starts. Copy the
whole ``data.cache_dir`` to offline machines.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
from data.tokenizers import _resolve_local, saved_tokenizer_dir  # noqa: E402
from evaluation import checkpoint_config  # noqa: E402
from runtime import cli  # noqa: E402

log = logging.getLogger("prepare_data")
checkpoint_config.register_resolvers()  # configs/config.yaml's hydra.run.dir uses it


def save_tokenizer(config: DictConfig, tokenizer: object) -> None:
    """Keep a copy of a Hub tokenizer next to the data cache (local tokenizers are left alone)."""
    target = saved_tokenizer_dir(config.data)
    if target is None or _resolve_local(str(config.data.tokenizer_name_or_path)) is not None:
        return
    if not target.is_dir():
        tokenizer.save_pretrained(str(target))
        log.info("saved tokenizer %s to %s", config.data.tokenizer_name_or_path, target)


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(config: DictConfig) -> None:
    with cli.user_errors():  # a user's mistake or a missing download: one line, exit 2
        prepare(config)


def prepare(config: DictConfig) -> None:
    tokenizer = data.get_tokenizer(config)
    if config.data.name in ("embedded", "synthetic"):
        train, valid = data.get_datasets(config, tokenizer)
        log.info("%s needs no preparation: %d train / %d valid blocks", config.data.name,
                 len(train), len(valid))
        return
    save_tokenizer(config, tokenizer)
    data.get_datasets(config, tokenizer)
    length = config.model.length
    rows = []
    for role in ("train", "valid"):
        split = config.data[role]
        path = data.cache_path(config.data, split, length)
        stats = json.loads(data.manifest_path(path).read_text())["stats"]
        rows.append((role, split, stats, path))
    log.info("%s ready (model.length=%d, vocabulary %d, cache_dir %s):", config.data.name,
             length, len(tokenizer), config.data.cache_dir)
    for role, split, stats, path in rows:
        log.info("  %-5s %-18s %12s documents %12s blocks %15s tokens  %s", role, split,
                 f"{stats['documents']:,}", f"{stats['blocks']:,}", f"{stats['tokens']:,}", path)


if __name__ == "__main__":
    main()
