"""Hub datasets: download (with the parquet fallback), split slicing, tokenise + pack in chunks
with progress, and the tokenised cache with its manifest.

Token ids are stored as int32 and the attention mask as int8 (OpenWebText at L=1024: ~45 GB
instead of ~145 GB as int64) and read back as int64 tensors (:class:`CachedBlocks`).

A split is cached under ``data.cache_dir`` (``save_to_disk``) in a directory whose name carries
what it depends on, next to a manifest ``<directory>.json`` holding the build settings and the
counts (documents, blocks, tokens). Loading checks the manifest against the run's settings and
refuses a cache built with another tokenizer, length, wrap layout or source, naming the reason.

Packing batches are the consecutive groups of ``data.map_batch_size`` documents from the start
of the split, whatever ``data.num_proc`` (chunks handed to the worker processes are whole
multiples of it), so a cache does not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from data.offline import offline_by_env, offline_reason
from data.packing import bos_per_document, tokenize_and_block, wrap_ids
from runtime.config import ConfigError

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 3  # bump when the cached token layout changes; part of the cache path
BATCH_COLUMNS = ("input_ids", "attention_mask")
PARQUET_REVISION = "refs/convert/parquet"  # the Hub's automatic parquet conversion
SCRIPT_ERROR = "Dataset scripts are no longer supported"  # datasets>=4 on a script-based id
MIN_CHUNK_DOCUMENTS = 500_000  # documents per progress report (and per worker-pool start)
_SPLIT_SPEC = re.compile(r"^(?P<base>[\w.-]+)(?:\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


class DataCacheMissingError(ConfigError, RuntimeError):
    """The tokenised cache is missing and the raw dataset cannot be fetched from the Hub (a
    user's set-up: one line at the command line, cli.user_errors)."""


class DatasetLoadError(RuntimeError):
    """The raw dataset could not be loaded from the Hub, also not from its parquet revision."""


class CacheMismatchError(RuntimeError):
    """A tokenised cache was built with other settings than this run's."""


# --------------------------------------------------------------------------- naming


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _layout_tag(data: DictConfig) -> str:
    if not data.wrap:
        return "pad"
    bos, eos = data.get("wrap_bos_token"), data.get("wrap_eos_token")
    tag = "wrap" if bos_per_document(data) else "wrapeos"
    if bos is not None or eos is not None:
        tag += f"_{bos or 'bos'}_{eos or 'eos'}"
    return tag


def cache_path(data: DictConfig, split: str, length: int) -> Path:
    """Directory of the tokenised cache of one split; the name carries everything it depends on."""
    tokenizer_tag = str(data.tokenizer_name_or_path)
    if tokenizer_tag.endswith(".json"):
        tokenizer_tag = Path(tokenizer_tag).stem
    base, start, stop = parse_split(split)
    if start is not None or stop is not None:  # "train[:40]" and "train[40:]" must differ
        base += f"_{'start' if start is None else start}_to_{'end' if stop is None else stop}"
    parts = [data.name, base, tokenizer_tag, f"L{length}", _layout_tag(data),
             f"v{CACHE_FORMAT_VERSION}"]
    return Path(data.cache_dir).expanduser() / "-".join(_slug(p) for p in parts)


def manifest_path(path: Path) -> Path:
    """The manifest written next to a cache directory."""
    return path.with_name(path.name + ".json")


# --------------------------------------------------------------------------- split slicing


def parse_split(spec: str) -> tuple[str, int | None, int | None]:
    """``"train[:-100000]"`` -> ``("train", None, -100000)``; integer slices only."""
    match = _SPLIT_SPEC.match(spec.replace(" ", ""))
    if match is None:
        raise ValueError(f"split {spec!r} is not of the form name or name[start:stop] with "
                         "integer start/stop (e.g. train[:-100000]); set data.train/data.valid")
    def num(s: str | None) -> int | None:
        return int(s) if s else None
    return match["base"], num(match["start"]), num(match["stop"])


def slice_rows(num_rows: int, start: int | None, stop: int | None) -> range:
    """The rows ``[start:stop]`` of a split of ``num_rows`` (Python slice semantics)."""
    return range(num_rows)[slice(start, stop)]


# --------------------------------------------------------------------------- raw download


def _load_dataset(path: str, name: str | None, split: str, revision: str | None,
                  data_dir: str | None = None) -> Any:
    """``datasets.load_dataset`` (tests replace this with a local stand-in for the Hub).
    An unreachable Hub is a ConnectionError at once, not after the client's retries; with an
    offline variable set, datasets reads its own cache."""
    import datasets  # seconds to import; Hub data only

    if offline_by_env() is None and not os.path.isdir(path):
        reason = offline_reason()
        if reason is not None:
            raise ConnectionError(reason)

    return datasets.load_dataset(path, name, split=split, revision=revision, data_dir=data_dir)


def _load_at(data: DictConfig, base_split: str, revision: str | None) -> Any:
    """One load; on the parquet revision the configuration is a folder (``<config>/<split>/``),
    so ``data.hf_config`` is passed as ``data_dir`` there."""
    if revision == PARQUET_REVISION:
        return _load_dataset(data.hf_path, None, base_split, revision, data.hf_config)
    return _load_dataset(data.hf_path, data.hf_config, base_split, revision)


def _missing_cache_error(data: DictConfig, split: str, path: Path,
                         reason: str) -> DataCacheMissingError:
    return DataCacheMissingError(
        f"dataset {data.name!r} (Hub id {data.hf_path!r}, split {split!r}) has no tokenised cache "
        f"at {path} (data.cache_dir={data.cache_dir}) and the raw data cannot be fetched: {reason}. "
        "Provide it: where the Hub is reachable, run `python scripts/prepare_data.py` with this "
        f"run's data= and model.length= (data.name={data.name}) and copy that data.cache_dir "
        "here (point DATA_DIR or data.cache_dir at it); or, with the raw dataset "
        "already in the Hugging Face cache (HF_HOME), set HF_DATASETS_OFFLINE=1.")


def load_raw_split(data: DictConfig, base_split: str, path: Path) -> Any:
    """The raw Hub split ``base_split`` (no slicing); a script-based id is retried once on its
    parquet revision (logged); a second failure is one error naming the override to set."""
    import datasets  # seconds to import; Hub data only

    revision = data.hf_revision
    try:
        return _load_at(data, base_split, revision)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        variable = offline_by_env()
        reason = (f"{variable} is set and the Hugging Face cache does not hold it"
                  if variable is not None else f"{type(err).__name__}: {err}")
        raise _missing_cache_error(data, base_split, path, reason) from None
    except RuntimeError as err:
        if SCRIPT_ERROR not in str(err) or revision == PARQUET_REVISION:
            raise
        log.warning("data.hf_path=%s is a script-based dataset (%s); retrying on its parquet "
                    "revision %s", data.hf_path, err, PARQUET_REVISION)
    try:
        raw = _load_at(data, base_split, PARQUET_REVISION)
    except Exception as err:  # noqa: BLE001 -- reported with the override to set, then re-raised
        raise DatasetLoadError(
            f"dataset {data.hf_path!r} (data.hf_path, config {data.hf_config!r}, split "
            f"{base_split!r}) is script-based, which datasets>=4 refuses, and its parquet "
            f"revision {PARQUET_REVISION!r} failed too ({type(err).__name__}: {err}). Set "
            "data.hf_path to a parquet dataset id and/or data.hf_revision to a revision serving "
            "parquet files, or install datasets<4 to run the script.") from None
    log.warning("loaded %s/%s from revision %s: set data.hf_revision=%s to skip the failed "
                "first attempt", data.hf_path, base_split, PARQUET_REVISION, PARQUET_REVISION)
    return raw


def _check_split_size(data: DictConfig, base_split: str, num_rows: int) -> None:
    sizes = data.get("hf_split_sizes") or {}
    expected = sizes.get(base_split)
    if expected is not None and int(expected) != num_rows:
        raise DatasetLoadError(
            f"{data.hf_path} (revision {data.hf_revision}) split {base_split!r} has {num_rows:,} "
            f"documents, the paper's data has {int(expected):,} (data.hf_split_sizes."
            f"{base_split}): a partial parquet conversion or another version of the dataset. "
            "Point data.hf_path/data.hf_revision at the full dataset, or set "
            f"data.hf_split_sizes.{base_split}=null to accept it.")


# --------------------------------------------------------------------------- tokenise + pack


def _map_fn(batch: dict, tokenizer: Any, length: int, wrap: bool, detokenizer: str | None,
            text_column: str, bos_id: int, eos_id: int, doc_bos: bool) -> dict:
    return tokenize_and_block(batch[text_column], tokenizer, length, wrap, detokenizer,
                              bos_id, eos_id, doc_bos)


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def tokenize_split(raw: Any, data: DictConfig, tokenizer: Any, length: int, desc: str,
                   min_chunk: int = MIN_CHUNK_DOCUMENTS) -> Any:
    """Tokenise + pack a raw split with ``data.num_proc`` processes, logging documents/s and an
    ETA after every chunk; packing batches are the consecutive ``data.map_batch_size`` groups."""
    import datasets  # seconds to import; Hub data only

    if data.text_column not in raw.column_names:
        raise ValueError(f"{data.hf_path} split has columns {raw.column_names}; "
                         f"set data.text_column to the text column")
    batch, procs = int(data.map_batch_size), max(1, int(data.num_proc))
    bos, eos = wrap_ids(tokenizer, data)
    kwargs = {"tokenizer": tokenizer, "length": length, "wrap": bool(data.wrap),
              "detokenizer": data.detokenizer, "text_column": data.text_column,
              "bos_id": bos, "eos_id": eos, "doc_bos": bos_per_document(data)}
    unit = batch * procs  # a chunk of k * unit documents gives each process whole batches
    chunk = unit * max(1, math.ceil(min_chunk / unit))
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "attention_mask": datasets.Sequence(datasets.Value("int8"))})
    n, parts, start, began = len(raw), [], 0, time.perf_counter()
    while start < n:
        stop = min(start + chunk, n)
        if stop - start >= unit:  # whole batches for every process
            stop = start + (stop - start) // unit * unit
            nproc = procs if procs > 1 else None
        else:  # the last < batch * procs documents, in one process: batches stay aligned
            nproc = None
        part = raw.select(range(start, stop)) if (start, stop) != (0, n) else raw
        parts.append(part.map(_map_fn, batched=True, batch_size=batch, num_proc=nproc,
                              remove_columns=raw.column_names, fn_kwargs=kwargs,
                              load_from_cache_file=False, features=features, desc=f"{desc} [{start:,}:{stop:,}]"))
        start = stop
        elapsed = time.perf_counter() - began
        rate = start / max(elapsed, 1e-9)
        log.info("%s: %s/%s documents tokenised (%.0f docs/s), ETA %s", desc, f"{start:,}",
                 f"{n:,}", rate, _format_seconds((n - start) / max(rate, 1e-9)))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# --------------------------------------------------------------------------- manifest


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (16 hex digits) of the tokenizer's vocabulary (token -> id)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def build_settings(data: DictConfig, split: str, tokenizer: Any, length: int) -> dict[str, Any]:
    """What a cache depends on; compared field by field when the cache is loaded."""
    bos, eos = wrap_ids(tokenizer, data)
    return {"format_version": CACHE_FORMAT_VERSION, "hf_path": data.hf_path,
            "hf_config": data.hf_config, "split": split,
            "tokenizer": str(data.tokenizer_name_or_path), "vocab_size": len(tokenizer),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "length": int(length),
            "wrap": bool(data.wrap), "bos_id": bos, "eos_id": eos,
            "bos_per_document": bos_per_document(data), "detokenizer": data.detokenizer,
            "map_batch_size": int(data.map_batch_size)}


def check_manifest(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the cache at ``path``; a mismatch with ``expected`` raises
    :class:`CacheMismatchError` listing every differing setting."""
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise CacheMismatchError(f"tokenised cache {path} has no manifest {mpath.name} (built by "
                                 "an older version): delete the directory and rerun "
                                 "scripts/prepare_data.py")
    manifest = json.loads(mpath.read_text())
    built = manifest.get("settings", {})
    reasons = [f"{key}: cache built with {built.get(key)!r}, this run uses {value!r}"
               for key, value in expected.items() if built.get(key) != value]
    if reasons:
        raise CacheMismatchError(
            f"tokenised cache {path} was built with other settings; refusing it:\n  "
            + "\n  ".join(reasons)
            + "\nDelete the directory (or use another data.cache_dir) and rerun "
            "scripts/prepare_data.py with this run's data/model settings.")
    return manifest


def _write_manifest(path: Path, settings: dict[str, Any], stats: dict[str, int]) -> None:
    tmp = manifest_path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"settings": settings, "stats": stats}, indent=2) + "\n")
    tmp.rename(manifest_path(path))


def split_stats(num_documents: int, tokenized: Any) -> dict[str, int]:
    """Documents read, blocks written and real (attention-mask 1) tokens in them."""
    tokens = 0
    for batch in tokenized.with_format("arrow", columns=["attention_mask"]).iter(batch_size=65536):
        tokens += int(_block_columns(batch, ("attention_mask",))["attention_mask"].sum())
    return {"documents": int(num_documents), "blocks": len(tokenized), "tokens": tokens}


def _block_columns(table: Any, columns: tuple[str, ...] = BATCH_COLUMNS,
                   ) -> dict[str, torch.Tensor]:
    """Rows of equal-length integer list columns of a pyarrow table -> {name: int64 (n, L)}.

    Read through Arrow, not through a ``datasets`` numpy / torch formatter: with some
    ``datasets`` 3.x and torchvision pairs those formatters fail importing torchvision's
    removed ``VideoReader`` (seen with torchvision on a CUDA image)."""
    out = {}
    for name in columns:
        column = table.column(name).combine_chunks()
        flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        out[name] = torch.from_numpy(flat.reshape(len(column), -1))
    return out


# --------------------------------------------------------------------------- split


class CachedBlocks(torch.utils.data.Dataset):
    """A cached split as items ``{"input_ids", "attention_mask"}`` of int64 tensors (L,) (or
    (B, L) for a slice), read from the int32/int8 columns on disk."""

    def __init__(self, dataset: Any):
        self.dataset = dataset.with_format("arrow", columns=list(BATCH_COLUMNS))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> dict[str, torch.Tensor]:
        rows = _block_columns(self.dataset[key])
        if isinstance(key, (int, np.integer)):
            return {k: v[0] for k, v in rows.items()}
        return rows

    def __getitems__(self, keys: list[int]) -> list[dict[str, torch.Tensor]]:
        batch = _block_columns(self.dataset[keys])  # one columnar read for the whole batch
        return [{k: batch[k][i] for k in BATCH_COLUMNS} for i in range(len(keys))]


def hub_split(data: DictConfig, split: str, tokenizer: Any, length: int) -> Any:
    """Tokenised, packed split of a Hub dataset: from the (checked) cache, or built once and
    cached with its manifest."""
    import datasets  # seconds to import; Hub data only

    if data.streaming:
        raise ValueError("data.streaming=true is not supported: packing and exact resume need the "
                         "whole split; set data.streaming=false")
    path = cache_path(data, split, length)
    settings = build_settings(data, split, tokenizer, length)
    if path.is_dir():
        manifest = check_manifest(path, settings)
        log.info("loading tokenised %s/%s from %s (%s)", data.name, split, path, manifest["stats"])
        return CachedBlocks(datasets.load_from_disk(str(path)))
    base, start, stop = parse_split(split)
    raw = load_raw_split(data, base, path)
    _check_split_size(data, base, len(raw))
    rows = slice_rows(len(raw), start, stop)
    if (rows.start, rows.stop) != (0, len(raw)):
        raw = raw.select(rows)
    if len(raw) == 0:
        raise ValueError(f"split {split!r} of {data.hf_path} is empty; check data.train/data.valid")
    tokenized = tokenize_split(raw, data, tokenizer, length, f"tokenising {data.name}/{split}")
    stats = split_stats(len(raw), tokenized)
    # write to a temporary directory and rename: an interrupted run leaves no half cache
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenized.save_to_disk(str(tmp))
    tmp.rename(path)
    _write_manifest(path, settings, stats)
    log.info("wrote tokenised %s/%s to %s: %d documents, %d blocks, %d tokens", data.name, split,
             path, stats["documents"], stats["blocks"], stats["tokens"])
    return CachedBlocks(datasets.load_from_disk(str(path)))
