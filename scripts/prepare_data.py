"""Build the tokenised cache of a dataset once (needs the Hugging Face Hub), e.g.

    python scripts/prepare_data.py data=lm1b-wrap model.length=128
    python scripts/prepare_data.py data=openwebtext-split model.length=1024

It composes the same Hydra config as main.py, so the cache lands where training looks for it
(``data.cache_dir``, default ``$DATA_DIR`` or ./data_cache); copy that directory to offline
machines.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataloader  # noqa: E402

log = logging.getLogger("prepare_data")


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(config: DictConfig) -> None:
    tokenizer = dataloader.get_tokenizer(config)
    train, valid = dataloader.get_datasets(config, tokenizer)
    log.info("%s ready: %d train / %d valid blocks of %d tokens, vocabulary %d (cache_dir %s)",
             config.data.name, len(train), len(valid), config.model.length, len(tokenizer),
             config.data.cache_dir)


if __name__ == "__main__":
    main()
