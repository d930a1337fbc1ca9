"""Datasets by ``data.name`` and the Lightning data module.

Every dataset yields the batch format used everywhere: ``{"input_ids": LongTensor (L,),
"attention_mask": LongTensor (L,)}`` (1 = real token incl. BOS/EOS, 0 = padding); the default
collate stacks them to (B, L).

Datasets (``data.name``):
  embedded   public-domain Shakespeare shipped in assets/ (no network), tokenised in memory
  synthetic  the exact-likelihood source of ``data/synthetic.py``
  other      a Hugging Face Hub dataset (``data.hf_path``), tokenised once into a cache under
             ``data.cache_dir`` and read back (:mod:`data.hub`)
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from data import synthetic
from data.embedded import embedded_corpus_documents
from data.hub import hub_split
from data.packing import TokenBlockDataset, bos_per_document, tokenize_and_block, wrap_ids
from data.sampler import ResumableDistributedSampler

log = logging.getLogger(__name__)


def _embedded_split(data: DictConfig, split: str, tokenizer: Any, length: int) -> TokenBlockDataset:
    docs = embedded_corpus_documents(split)
    bos, eos = wrap_ids(tokenizer, data)
    ids, mask = [], []
    for start in range(0, len(docs), data.map_batch_size):
        block = tokenize_and_block(docs[start: start + data.map_batch_size], tokenizer, length,
                                   data.wrap, data.detokenizer, bos, eos, bos_per_document(data))
        ids.extend(block["input_ids"])
        mask.extend(block["attention_mask"])
    if not ids:
        raise ValueError(f"embedded split {split!r} yields no block of model.length={length}")
    log.info("embedded/%s: %d blocks of %d tokens", split, len(ids), length)
    return TokenBlockDataset(torch.tensor(ids, dtype=torch.long),
                             torch.tensor(mask, dtype=torch.long))


def get_datasets(config: DictConfig, tokenizer: Any) -> tuple[Any, Any]:
    """(train, valid) datasets of ``{"input_ids", "attention_mask"}`` items of length model.length."""
    data, length = config.data, config.model.length
    if data.name == "synthetic":
        return synthetic.make_datasets(data, length)
    if data.name == "embedded":
        return (_embedded_split(data, data.train, tokenizer, length),
                _embedded_split(data, data.valid, tokenizer, length))
    return (hub_split(data, data.train, tokenizer, length),
            hub_split(data, data.valid, tokenizer, length))


class FLMDataModule(pl.LightningDataModule):
    """Train/valid loaders over :class:`ResumableDistributedSampler` whose state rides in checkpoints.

    Consumption is counted in :meth:`on_before_batch_transfer`, which Lightning calls once per
    training micro-batch right before that batch's step (after its own one-batch prefetch and any
    DataLoader worker prefetch), so ``consumed`` counts exactly the batches the loop trained on.
    The trainer must be built with ``use_distributed_sampler=False``, and the LightningModule must
    not override ``on_before_batch_transfer`` (Lightning then calls only the module's hook)."""

    def __init__(self, config: DictConfig, tokenizer: Any):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.train_dataset: Any = None
        self.valid_dataset: Any = None
        self.train_sampler: ResumableDistributedSampler | None = None
        self._pending_sampler_state: dict | None = None

    def prepare_data(self) -> None:
        # runs on one process per node before setup(): builds the Hub caches without races
        if self.train_dataset is None and self.config.data.name not in ("embedded", "synthetic"):
            get_datasets(self.config, self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            self.train_dataset, self.valid_dataset = get_datasets(self.config, self.tokenizer)

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def _accumulate(self) -> int:
        """Micro-batches per optimizer step: the trainer's, else the resolved config's, else 1."""
        accumulate = getattr(self.trainer, "accumulate_grad_batches", None)
        if accumulate is None:
            accumulate = self.config.get("trainer", {}).get("accumulate_grad_batches", 1)
        return int(accumulate)

    def _loader_generator(self) -> torch.Generator:
        # the DataLoader draws its workers' base seed from this, not from the global torch RNG,
        # so building an iterator (e.g. after a resume) does not shift dropout's random stream
        return torch.Generator().manual_seed(int(self.config.seed))

    def _worker_settings(self) -> dict[str, Any]:
        """DataLoader keyword arguments from ``loader.num_workers`` / ``loader.pin_memory``
        (as runtime/config.py resolved them: ``auto`` is 4 workers and pinned memory on
        CUDA); workers live across epochs and validation runs."""
        loader = self.config.loader
        workers = int(loader.num_workers)
        return {"num_workers": workers, "pin_memory": bool(loader.pin_memory),
                "persistent_workers": workers > 0}

    def _loader(self, dataset: Any, sampler: ResumableDistributedSampler,
                batch_size: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
            generator=self._loader_generator(), **self._worker_settings())

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        self.setup()
        if self.train_sampler is None:
            rank, world = self._rank_world()
            # laid out by global batch: slot (accumulation index * world + rank) of every
            # global batch holds the same samples whatever the devices/accumulation split
            self.train_sampler = ResumableDistributedSampler(
                len(self.train_dataset), num_replicas=world, rank=rank, shuffle=True,
                seed=self.config.seed, drop_last=True,
                batch_size=int(self.config.loader.batch_size), accumulate=self._accumulate())
        if self._pending_sampler_state is not None:
            self.train_sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None
        return self._loader(self.train_dataset, self.train_sampler, self.config.loader.batch_size)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        self.setup()
        rank, world = self._rank_world()
        # fixed order, every sample seen; with several ranks the last few samples repeat
        sampler = ResumableDistributedSampler(len(self.valid_dataset), num_replicas=world,
                                              rank=rank, shuffle=False, drop_last=False)
        return torch.utils.data.DataLoader(
            self.valid_dataset, batch_size=self.config.loader.eval_batch_size, sampler=sampler,
            drop_last=False, generator=self._loader_generator(), **self._worker_settings())

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and self.train_sampler is not None:
            self.train_sampler.advance(batch["input_ids"].shape[0])
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self.train_sampler is None:
            pending = self._pending_sampler_state
            return {"sampler": dict(pending)} if pending is not None else {}
        return {"sampler": self.train_sampler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores the data module before it builds the loaders: apply it then
        state = state_dict.get("sampler")
        if state is None:
            return
        if self.train_sampler is None:
            self._pending_sampler_state = dict(state)
        else:
            self.train_sampler.load_state_dict(state)
