"""Data: tokenizers, packed token datasets, the resumable sampler and the Lightning data module.

Every dataset yields the batch format used everywhere: ``{"input_ids": LongTensor (L,),
"attention_mask": LongTensor (L,)}`` (1 = real token incl. BOS/EOS, 0 = padding); the default
collate stacks them to (B, L).

Datasets (``data.name``):
  embedded   public-domain Shakespeare shipped in assets/ (no network), tokenised in memory
  synthetic  the exact-likelihood source of ``synthetic.py``
  other      a Hugging Face Hub dataset (``data.hf_path``), tokenised once into a cache under
             ``data.cache_dir`` (``save_to_disk``) and read back with ``load_from_disk``

Packing ("wrap", as in MDLM/DUO's wrapped LM1B): each document becomes ``[BOS] doc [EOS]``, the
documents are concatenated, cut into chunks of ``L - 2`` tokens, and every chunk becomes the block
``[BOS] chunk [EOS]`` of length ``L``. The tail that does not fill a chunk is dropped per packing
batch of ``data.map_batch_size`` documents (fewer than L tokens per batch).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent
EMBEDDED_CORPUS = REPO_ROOT / "assets" / "embedded_corpus.jsonl.gz"
EMBEDDED_SPLITS = ("train", "valid")
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "[BOS]", "[EOS]", "[PAD]"  # the embedded tokenizer's specials
CACHE_FORMAT_VERSION = 1  # bump when the cached token layout changes; part of the cache path
BATCH_COLUMNS = ("input_ids", "attention_mask")
OFFLINE_ENV_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


class DataCacheMissingError(RuntimeError):
    """The tokenised cache is missing and the raw dataset cannot be fetched from the Hub."""


# --------------------------------------------------------------------------- detokenisers


_LM1B_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(https?) : / / "), r"\1://"),  # "http : / / " -> "http://"
    (re.compile(r"\" ([^\"]*?) \""), r'"\1"'),  # '" a b "' -> '"a b"'
    (re.compile(r"([(\[{]) "), r"\1"),  # "( a" -> "(a"
    (re.compile(r" ([)\]}])"), r"\1"),  # "a )" -> "a)"
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", re.IGNORECASE), r"\1"),  # "do n't" -> "don't"
    (re.compile(r" ([.,!?;:%])(?= |$)"), r"\1"),  # "a , b ." -> "a, b."
    (re.compile(r"([$£€#]) (?=\d)"), r"\1"),  # "$ 5" -> "$5"
)


def _lm1b_detokenize(text: str) -> str:
    """Undo LM1B's tokenised spacing (" 's", " , ", "( x )", ...)."""
    for pattern, replacement in _LM1B_RULES:
        text = pattern.sub(replacement, text)
    return text


DETOKENIZERS = {"lm1b": _lm1b_detokenize}


def detokenize(name: str | None, texts: Sequence[str]) -> list[str]:
    """Apply the dataset-specific detokeniser ``name`` (``None``: identity) to every text."""
    if name is None:
        return list(texts)
    if name not in DETOKENIZERS:
        raise ValueError(f"unknown data.detokenizer={name!r}; choose one of "
                         f"{sorted(DETOKENIZERS)} or null")
    fn = DETOKENIZERS[name]
    return [fn(t) for t in texts]


# --------------------------------------------------------------------------- embedded corpus


@lru_cache(maxsize=1)
def _embedded_records() -> tuple[dict, ...]:
    if not EMBEDDED_CORPUS.is_file():
        raise FileNotFoundError(f"{EMBEDDED_CORPUS} is missing; regenerate it with "
                                "scripts/prepare_embedded_corpus.py (see assets/README.md)")
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


def embedded_corpus_documents(split: str) -> list[str]:
    """Raw text of the embedded corpus, one document per work, in file-name order.

    ``split`` is ``"train"`` or ``"valid"`` (the last works, held out)."""
    if split not in EMBEDDED_SPLITS:
        raise ValueError(f"embedded corpus split must be one of {EMBEDDED_SPLITS}, got {split!r}")
    return [r["text"] for r in _embedded_records() if r["split"] == split]


# --------------------------------------------------------------------------- tokenizers


def _resolve_local(path_or_name: str) -> Path | None:
    """A local path as given (cwd) or relative to the repo root; None if neither exists."""
    for candidate in (Path(path_or_name).expanduser(), REPO_ROOT / path_or_name):
        if candidate.exists():
            return candidate
    return None


def _set_specials(tokenizer: Any) -> Any:
    """BERT-style tokenizers have no BOS/EOS: use [CLS]/[SEP]; add a [PAD] if there is none."""
    if tokenizer.bos_token is None:
        if tokenizer.cls_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a BOS nor a CLS token")
        tokenizer.bos_token = tokenizer.cls_token
    if tokenizer.eos_token is None:
        if tokenizer.sep_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither an EOS nor a SEP token")
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        # gpt2: one extra id, so len(tokenizer) (the model's vocabulary) grows by one
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def get_tokenizer(config: DictConfig) -> Any:
    """The tokenizer named by ``config.data`` (a ``PreTrainedTokenizerFast``-like object).

    The model's vocabulary size is ``len(tokenizer)``. ``data.tokenizer_name_or_path`` is a
    ``tokenizer.json`` file, a local tokenizer directory, or a Hub name."""
    data = config.data
    if data.name == "synthetic":
        import synthetic

        return synthetic.make_tokenizer(data)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    name = data.tokenizer_name_or_path
    local = _resolve_local(name)
    if local is not None and local.is_file():
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(local), bos_token=BOS_TOKEN,
                                            eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
        expected = data.get("tokenizer_vocab_size")
        if expected is not None and len(tokenizer) != expected:
            raise ValueError(
                f"{local} has {len(tokenizer)} tokens but data.tokenizer_vocab_size={expected}; "
                "rerun scripts/prepare_embedded_corpus.py (it reads configs/data/embedded.yaml)")
        return tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local is not None else name)
    except OSError as err:
        raise OSError(
            f"could not load tokenizer {name!r} (data.tokenizer_name_or_path): it is neither a "
            "local file/directory nor reachable/cached on the Hugging Face Hub. Run once with "
            "network access to cache it, or point data.tokenizer_name_or_path to a local "
            "tokenizer directory or tokenizer.json") from err
    return _set_specials(tokenizer)


# --------------------------------------------------------------------------- packing


def pack_sequences(token_lists: Sequence[Sequence[int]], length: int, bos_id: int,
                   eos_id: int) -> list[list[int]]:
    """Wrap documents into blocks of ``length`` tokens with BOS first and EOS last.

    Documents become ``[BOS] doc [EOS]`` and are concatenated; the stream is cut into chunks of
    ``length - 2`` tokens, each returned as ``[BOS] chunk [EOS]``. The last partial chunk is
    dropped."""
    if length < 3:
        raise ValueError(f"model.length={length} leaves no room for content between BOS and EOS")
    stream = []
    for ids in token_lists:
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


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids without automatic specials; fast tokenizers skip offsets (same ids, ~35% faster)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                     verbose=False)["input_ids"]


def tokenize_and_block(texts: Sequence[str], tokenizer: Any, length: int, wrap: bool,
                       detokenizer: str | None) -> dict[str, list[list[int]]]:
    """Detokenise, tokenise (no automatic specials) and pack (``wrap``) or pad to ``length``."""
    encoded = _encode(tokenizer, detokenize(detokenizer, texts))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if wrap:
        ids = pack_sequences(encoded, length, bos, eos)
        return {"input_ids": ids, "attention_mask": [[1] * length for _ in ids]}
    ids, mask = pad_sequences(encoded, length, bos, eos, tokenizer.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask}


def _tokenize_map_fn(batch: dict, tokenizer: Any, length: int, wrap: bool, detokenizer: str | None,
                     text_column: str) -> dict:
    return tokenize_and_block(batch[text_column], tokenizer, length, wrap, detokenizer)


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


# --------------------------------------------------------------------------- datasets


def _embedded_split(data: DictConfig, split: str, tokenizer: Any, length: int) -> TokenBlockDataset:
    docs = embedded_corpus_documents(split)
    ids, mask = [], []
    for start in range(0, len(docs), data.map_batch_size):
        block = tokenize_and_block(docs[start: start + data.map_batch_size], tokenizer, length,
                                   data.wrap, data.detokenizer)
        ids.extend(block["input_ids"])
        mask.extend(block["attention_mask"])
    if not ids:
        raise ValueError(f"embedded split {split!r} yields no block of model.length={length}")
    log.info("embedded/%s: %d blocks of %d tokens", split, len(ids), length)
    return TokenBlockDataset(torch.tensor(ids, dtype=torch.long),
                             torch.tensor(mask, dtype=torch.long))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def cache_path(data: DictConfig, split: str, length: int) -> Path:
    """Directory of the tokenised cache of one split; the name carries everything it depends on."""
    tokenizer_tag = data.tokenizer_name_or_path
    if tokenizer_tag.endswith(".json"):
        tokenizer_tag = Path(tokenizer_tag).stem
    parts = [data.name, split, tokenizer_tag, f"L{length}", "wrap" if data.wrap else "pad",
             f"v{CACHE_FORMAT_VERSION}"]
    return Path(data.cache_dir).expanduser() / "-".join(_slug(p) for p in parts)


def _offline_by_env() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in OFFLINE_ENV_VARS)


def _missing_cache_error(data: DictConfig, split: str, path: Path, reason: str) -> DataCacheMissingError:
    return DataCacheMissingError(
        f"dataset {data.name!r} (Hub id {data.hf_path!r}, split {split!r}) has no tokenised cache "
        f"at {path} (data.cache_dir={data.cache_dir}) and the raw data cannot be fetched: {reason}. "
        f"To prepare it, run `python scripts/prepare_data.py data={data.name}` (or this same "
        "command) once on a machine with access to the Hugging Face Hub and the same "
        "data.cache_dir (or copy the cache directory here); unset HF_DATASETS_OFFLINE / "
        "HF_HUB_OFFLINE for that run.")


def _hub_split(data: DictConfig, split: str, tokenizer: Any, length: int) -> Any:
    """Tokenised, packed split of a Hub dataset: from the cache, or built once and cached."""
    import datasets

    if data.streaming:
        raise ValueError("data.streaming=true is not supported: packing and exact resume need the "
                         "whole split; set data.streaming=false")
    path = cache_path(data, split, length)
    if path.is_dir():
        log.info("loading tokenised %s/%s from %s", data.name, split, path)
        return datasets.load_from_disk(str(path)).with_format("torch", columns=list(BATCH_COLUMNS))
    try:
        raw = datasets.load_dataset(data.hf_path, data.hf_config, split=split,
                                    revision=data.hf_revision)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        reason = "offline mode is set" if _offline_by_env() else f"{type(err).__name__}: {err}"
        raise _missing_cache_error(data, split, path, reason) from err
    if data.text_column not in raw.column_names:
        raise ValueError(f"{data.hf_path} split {split!r} has columns {raw.column_names}; "
                         f"set data.text_column to the text column")
    tokenized = raw.map(
        _tokenize_map_fn, batched=True, batch_size=data.map_batch_size, num_proc=data.num_proc,
        remove_columns=raw.column_names, desc=f"tokenising {data.name}/{split}",
        fn_kwargs={"tokenizer": tokenizer, "length": length, "wrap": data.wrap,
                   "detokenizer": data.detokenizer, "text_column": data.text_column})
    # write to a temporary directory and rename: an interrupted run leaves no half cache
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenized.save_to_disk(str(tmp))
    tmp.rename(path)
    log.info("wrote tokenised %s/%s (%d blocks) to %s", data.name, split, len(tokenized), path)
    return datasets.load_from_disk(str(path)).with_format("torch", columns=list(BATCH_COLUMNS))


def get_datasets(config: DictConfig, tokenizer: Any) -> tuple[Any, Any]:
    """(train, valid) datasets of ``{"input_ids", "attention_mask"}`` items of length model.length."""
    data, length = config.data, config.model.length
    if data.name == "synthetic":
        import synthetic

        return synthetic.make_datasets(data, length)
    if data.name == "embedded":
        return (_embedded_split(data, data.train, tokenizer, length),
                _embedded_split(data, data.valid, tokenizer, length))
    return (_hub_split(data, data.train, tokenizer, length),
            _hub_split(data, data.valid, tokenizer, length))


# --------------------------------------------------------------------------- sampler


class ResumableDistributedSampler(torch.utils.data.Sampler[int]):
    """Epoch-wise permutation laid out by global batch, that resumes mid-epoch exactly.

    Epoch ``e``'s global order is a permutation drawn from ``(seed, e)`` (or the identity if
    ``shuffle=False``), cut into global batches of ``G = batch_size * accumulate * num_replicas``
    samples. Micro-batch slot ``s = a * num_replicas + rank`` (``a`` = accumulation index) of
    global batch ``b`` holds ``order[b*G + s*batch_size : b*G + (s+1)*batch_size]``, so a global
    batch holds the same samples, slot by slot, whatever split of ``G`` into ranks and
    accumulation steps: the data side of "N GPUs equal 1 GPU with accumulation" (the noise and
    time draws are keyed by the same slot, see ``algo.FlowLM._slot``). With ``batch_size =
    accumulate = 1`` this is the usual strided split ``order[rank::num_replicas]``.

    The epoch has ``len // G`` global batches (``drop_last``) or the order padded by wrapping
    around to a multiple of ``G``. Iteration starts after the ``consumed`` samples of this rank;
    ``consumed`` advances only through :meth:`advance`, called by whoever hands batches to the
    training loop (see :class:`FLMDataModule`), so DataLoader prefetching does not count as
    consumption. ``len()`` is the full per-rank epoch, also after a resume (Lightning counts
    batches of the epoch with it)."""

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 batch_size: int = 1, accumulate: int = 1):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        if batch_size < 1 or accumulate < 1:
            raise ValueError(f"batch_size={batch_size} and accumulate={accumulate} must be >= 1")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.batch_size = batch_size
        self.accumulate = accumulate
        self.global_batch = batch_size * accumulate * num_replicas
        if drop_last:
            self.num_global_batches = dataset_len // self.global_batch
        else:
            self.num_global_batches = math.ceil(dataset_len / self.global_batch)
        if self.num_global_batches == 0:
            raise ValueError(f"dataset of {dataset_len} samples is smaller than one global batch "
                             f"of {self.global_batch} (loader.global_batch_size)")
        self.num_samples = self.num_global_batches * batch_size * accumulate  # per rank
        self.epoch = 0
        self.consumed = 0

    def global_order(self, epoch: int) -> np.ndarray:
        """All ranks' indices of ``epoch``, truncated or padded to whole global batches."""
        if self.shuffle:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            order = rng.permutation(self.dataset_len)
        else:
            order = np.arange(self.dataset_len)
        total = self.num_global_batches * self.global_batch
        if total > self.dataset_len:
            order = np.resize(order, total)  # wrap around: repeats the first entries
        return order[:total]

    def rank_indices(self, epoch: int) -> np.ndarray:
        """This rank's indices in the order it sees them: (global batch, accumulation, sample)."""
        blocks = self.global_order(epoch).reshape(
            self.num_global_batches, self.accumulate, self.num_replicas, self.batch_size)
        return blocks[:, :, self.rank, :].reshape(-1)

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices(self.epoch)[self.consumed:].tolist())

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; a call with the current epoch (Lightning does so on resume) keeps the
        position within it."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    def advance(self, num_samples: int) -> None:
        """Record that ``num_samples`` more samples of this rank reached the training loop."""
        self.consumed += num_samples

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "num_replicas": self.num_replicas,
                "batch_size": self.batch_size, "accumulate": self.accumulate,
                "dataset_len": self.dataset_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``, also when it was saved with another split of the same global
        batch (devices × nodes × micro-batch × accumulation): the position is a number of whole
        global batches, and global batch ``b`` holds the same samples under any split."""
        saved_len = state.get("dataset_len", self.dataset_len)
        if saved_len != self.dataset_len:
            raise ValueError(f"sampler state was saved over {saved_len} training samples, "
                             f"resuming over {self.dataset_len}: use the same training data")
        replicas = state.get("num_replicas", self.num_replicas)
        batch = state.get("batch_size", self.batch_size)
        accumulate = state.get("accumulate", self.accumulate)
        saved_global = replicas * batch * accumulate
        if saved_global != self.global_batch:
            raise ValueError(
                f"sampler state was saved with a global batch of {saved_global} ({replicas} "
                f"ranks x {batch} x {accumulate} accumulation), resuming with "
                f"{self.global_batch}: exact resume needs the same loader.global_batch_size")
        per_rank_step = batch * accumulate  # this rank's samples per global batch, then
        if state["consumed"] % per_rank_step:
            raise ValueError(f"consumed={state['consumed']} is not a whole number of global "
                             "batches: the checkpoint was not written at an optimizer step")
        consumed = state["consumed"] // per_rank_step * self.batch_size * self.accumulate
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"consumed={state['consumed']} outside the epoch: the checkpoint "
                             "belongs to a different dataset or batch setup")
        if (replicas, batch, accumulate) != (self.num_replicas, self.batch_size, self.accumulate):
            log.info("resuming a run saved with %d ranks x %d x %d accumulation on %d ranks x "
                     "%d x %d accumulation: same global batch, continuing at global batch %d",
                     replicas, batch, accumulate, self.num_replicas, self.batch_size,
                     self.accumulate, consumed // (self.batch_size * self.accumulate))
            if batch != self.batch_size:
                log.warning("loader.batch_size changed (%d -> %d): each global batch holds the "
                            "same samples, but the noise and time draws are keyed by "
                            "micro-batch slot, so they differ from the original run", batch,
                            self.batch_size)
        self.epoch = state["epoch"]
        self.consumed = consumed


# --------------------------------------------------------------------------- data module


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

    def _loader(self, dataset: Any, sampler: ResumableDistributedSampler,
                batch_size: int) -> torch.utils.data.DataLoader:
        loader = self.config.loader
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=loader.num_workers,
            pin_memory=loader.pin_memory, drop_last=True,
            persistent_workers=False, generator=self._loader_generator())

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
        loader = self.config.loader
        return torch.utils.data.DataLoader(
            self.valid_dataset, batch_size=loader.eval_batch_size, sampler=sampler,
            num_workers=loader.num_workers, pin_memory=loader.pin_memory, drop_last=False,
            generator=self._loader_generator())

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
