"""Data: detokenisers, the embedded corpus, tokenizers, packing, Hub datasets and their cache,
the resumable sampler and the Lightning data module (one module each)."""

from data.detokenize import DETOKENIZERS, detokenize
from data.embedded import EMBEDDED_CORPUS, EMBEDDED_SPLITS, REPO_ROOT, embedded_corpus_documents
from data.hub import (
    BATCH_COLUMNS,
    CACHE_FORMAT_VERSION,
    PARQUET_REVISION,
    CacheMismatchError,
    DataCacheMissingError,
    DatasetLoadError,
    cache_path,
    manifest_path,
)
from data.module import FLMDataModule, get_datasets
from data.packing import (
    TokenBlockDataset,
    pack_sequences,
    pad_sequences,
    tokenize_and_block,
    wrap_ids,
)
from data.sampler import ResumableDistributedSampler, global_batch_slot, split_micro_batch_index
from data.tokenizers import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    TokenizerUnavailableError,
    get_tokenizer,
)

__all__ = [
    "BATCH_COLUMNS", "BOS_TOKEN", "CACHE_FORMAT_VERSION", "DETOKENIZERS", "EMBEDDED_CORPUS",
    "EMBEDDED_SPLITS", "EOS_TOKEN", "PAD_TOKEN", "PARQUET_REVISION", "REPO_ROOT",
    "CacheMismatchError", "DataCacheMissingError", "DatasetLoadError", "FLMDataModule",
    "ResumableDistributedSampler", "TokenBlockDataset", "TokenizerUnavailableError",
    "cache_path", "detokenize", "embedded_corpus_documents", "get_datasets", "get_tokenizer",
    "global_batch_slot", "manifest_path", "pack_sequences", "pad_sequences",
    "split_micro_batch_index", "tokenize_and_block", "wrap_ids",
]
