"""Tokenise, then pack ("wrap") or pad documents into blocks of ``model.length`` tokens.

Wrap layout (the paper's, as in MDLM/DUO's wrapped LM1B/OWT): every document is followed by the
wrap EOS id, the documents of one packing batch (``data.map_batch_size`` documents) are
concatenated, the stream is cut into chunks of ``L - 2`` tokens, and every chunk becomes the
block ``[BOS] chunk [EOS]``; the tail that does not fill a chunk is dropped per packing batch.
With ``data.bos_per_document=true`` a document is ``[BOS] doc [EOS]`` in the stream (the embedded
corpus' layout). The BOS/EOS ids come from ``data.wrap_bos_token``/``data.wrap_eos_token``
(null: the tokenizer's BOS/EOS): the paper's LM1B uses [CLS] for both, its OWT gpt2's
``<|endoftext|>`` for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig

from data.detokenize import detokenize
from runtime.config import ConfigError

MIN_BLOCK_LENGTH = 3  # a text block is [BOS] content [EOS]: model.length of at least 3


def pack_sequences(token_lists: Sequence[Sequence[int]], length: int, bos_id: int,
                   eos_id: int, bos_per_document: bool = True) -> list[list[int]]:
    """Wrap documents into blocks of ``length`` tokens with BOS first and EOS last.

    Documents become ``doc [EOS]`` (``[BOS] doc [EOS]`` with ``bos_per_document``) and are
    concatenated; the stream is cut into chunks of ``length - 2`` tokens, each returned as
    ``[BOS] chunk [EOS]``. The last partial chunk is dropped."""
    if length < MIN_BLOCK_LENGTH:
        raise ConfigError(f"model.length={length} leaves no room for content between BOS and EOS")
    stream = []
    for ids in token_lists:
        if bos_per_document:
            stream.append(bos_id)
        stream.extend(ids)
        stream.append(eos_id)
    chunk = length - 2
    return [[bos_id, *stream[i: i + chunk], eos_id]
            for i in range(0, len(stream) - chunk + 1, chunk)]


def pad_sequences(token_lists: Sequence[Sequence[int]], length: int, bos_id: int, eos_id: int,
                  pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """One block per document: ``[BOS] doc[:length-2] [EOS]`` right-padded; returns (ids, mask)."""
    ids, mask = [], []
    for doc in token_lists:
        row = [bos_id, *doc[: length - 2], eos_id]
        n_pad = length - len(row)
        ids.append(row + [pad_id] * n_pad)
        mask.append([1] * len(row) + [0] * n_pad)
    return ids, mask


def _token_id(tokenizer: Any, token: str, key: str) -> int:
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise ConfigError(f"{key}={token!r} is not a token of {tokenizer.name_or_path!r}; use one "
                         "of its special tokens or null (the tokenizer's own)")
    return int(vocab[token])


def wrap_ids(tokenizer: Any, data: DictConfig) -> tuple[int, int]:
    """(BOS id, EOS id) of the wrap layout: ``data.wrap_bos_token``/``wrap_eos_token`` or the
    tokenizer's own BOS/EOS when null (or absent, in configs written before these keys)."""
    bos_token, eos_token = data.get("wrap_bos_token"), data.get("wrap_eos_token")
    bos = (tokenizer.bos_token_id if bos_token is None
           else _token_id(tokenizer, bos_token, "data.wrap_bos_token"))
    eos = (tokenizer.eos_token_id if eos_token is None
           else _token_id(tokenizer, eos_token, "data.wrap_eos_token"))
    return bos, eos


def bos_per_document(data: DictConfig) -> bool:
    """Whether every document opens with BOS in the stream (absent key: the layout of configs
    written before it existed, which did)."""
    return bool(data.get("bos_per_document", True))


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids without automatic specials; fast tokenizers skip offsets (same ids, ~35% faster)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                     verbose=False)["input_ids"]


def tokenize_and_block(texts: Sequence[str], tokenizer: Any, length: int, wrap: bool,
                       detokenizer: str | None, bos_id: int | None = None,
                       eos_id: int | None = None,
                       doc_bos: bool = True) -> dict[str, list[list[int]]]:
    """Detokenise, tokenise (no automatic specials) and pack (``wrap``) or pad to ``length``.

    ``bos_id``/``eos_id`` default to the tokenizer's; ``doc_bos`` is ``bos_per_document``."""
    encoded = encode(tokenizer, detokenize(detokenizer, texts))
    bos = tokenizer.bos_token_id if bos_id is None else bos_id
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    if wrap:
        ids = pack_sequences(encoded, length, bos, eos, doc_bos)
        return {"input_ids": ids, "attention_mask": [[1] * length for _ in ids]}
    ids, mask = pad_sequences(encoded, length, tokenizer.bos_token_id, tokenizer.eos_token_id,
                              tokenizer.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask}


class TokenBlockDataset(torch.utils.data.Dataset):
    """In-memory blocks: ``input_ids`` and ``attention_mask`` LongTensors of shape (N, L)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
            raise ValueError(f"expected two (N, L) tensors, got {tuple(input_ids.shape)} "
                             f"and {tuple(attention_mask.shape)}")
        self.input_ids = input_ids
        self.attention_mask = attention_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}
