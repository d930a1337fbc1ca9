"""The data entry point: tokenizer, datasets and loaders, as in the paper's code layout.

Everything here lives in ``data/`` (one module per piece) and is re-exported unchanged:

* ``get_tokenizer(config)``: the tokenizer named by ``config.data`` (data/tokenizers.py).
* ``get_datasets(config, tokenizer)``: the (train, valid) datasets of ``config.data``:
  the embedded corpus, a Hub dataset through its prepared cache, or the synthetic source
  (data/module.py).
* ``FLMDataModule(config, tokenizer)``: the Lightning data module whose loaders training and
  evaluation use, with the resumable sampler and the global-batch slot rule (data/module.py,
  data/sampler.py).
* ``tokenize_and_block``, ``pack_sequences``, ``wrap_ids``: the paper's packing of documents
  into blocks of ``model.length`` (data/packing.py); ``detokenize``: the LM1B/OWT detokenisers
  (data/detokenize.py); ``cache_path``: where a prepared split is cached (data/hub.py).

Example::

    from omegaconf import OmegaConf
    import dataloader
    config = OmegaConf.load("outputs/.../config_resolved.yaml")
    tokenizer = dataloader.get_tokenizer(config)
    train_set, valid_set = dataloader.get_datasets(config, tokenizer)
"""

from data import (
    FLMDataModule,
    ResumableDistributedSampler,
    cache_path,
    detokenize,
    get_datasets,
    get_tokenizer,
    pack_sequences,
    tokenize_and_block,
    wrap_ids,
)

__all__ = [
    "FLMDataModule", "ResumableDistributedSampler", "cache_path", "detokenize", "get_datasets",
    "get_tokenizer", "pack_sequences", "tokenize_and_block", "wrap_ids",
]
