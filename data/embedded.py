"""The embedded corpus: public-domain Shakespeare shipped in assets/ (no network)."""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_CORPUS = REPO_ROOT / "assets" / "embedded_corpus.jsonl.gz"
EMBEDDED_SPLITS = ("train", "valid")


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
