"""How long does ``scripts/prepare_data.py`` take on N cores? Times the real tokenise + pack
path (``data.hub.tokenize_split``: datasets.map over chunks, ``data.num_proc`` processes) on a
synthetic stand-in corpus and extrapolates to the full OpenWebText / LM1B splits.

    python bench/prepare_data_speed.py --corpus owt --num-proc 1 2 4 8 16
    python bench/prepare_data_speed.py --corpus lm1b --num-proc 1 16 --tokenizer bert-base-uncased

Stand-in corpus (no network): words drawn from the embedded corpus' word frequencies (so the
tokenizer sees English-like text), document lengths drawn as below; the tokenizer is a
byte-level BPE trained here on the embedded corpus (``--vocab-size``, GPT-2-like; pass
``--tokenizer`` for a real one, e.g. a cached gpt2 / bert-base-uncased or a local folder).

Assumed document lengths (tokens, log-normal, clipped below):
  owt   median 700, sigma 1.0, at least 128: mean ~1,150 tokens/document, matching OpenWebText's
        ~9.0e9 GPT-2 tokens over 8,013,769 documents (~1,128 per document); the 128 floor is the
        corpus' own filter (documents under 128 tokens were removed), and the heavy right tail
        (sigma 1) is that of web pages (a few documents of 10k+ tokens)
  lm1b  median 27, sigma 0.45, at least 3: LM1B is one sentence per document, 4.24e9 bytes over
        30,301,028 documents (~140 characters, ~27 words each)
Each worker process tokenises on one thread (TOKENIZERS_PARALLELISM=false), so N processes use
N cores; ``prepare_data.py`` itself runs ``data.num_proc`` forked workers the same way.
Words are joined to reach the drawn token count approximately (1.3 tokens per word assumed);
the measured tokens/document is printed, so the extrapolation uses measured rates.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
from data import hub  # noqa: E402

FULL_DOCUMENTS = {"owt": 8_013_769, "lm1b": 30_301_028 + 306_688}
LENGTHS = {"owt": (700.0, 1.0, 128), "lm1b": (27.0, 0.45, 3)}  # median, sigma, floor (tokens)
TOKENS_PER_WORD = 1.3


def word_distribution() -> tuple[list[str], np.ndarray]:
    counts = collections.Counter()
    for doc in data.embedded_corpus_documents("train"):
        counts.update(re.findall(r"\w+|[^\w\s]", doc))
    words, freq = zip(*counts.most_common())
    p = np.asarray(freq, dtype=np.float64)
    return list(words), p / p.sum()


def synthetic_corpus(kind: str, num_docs: int, seed: int) -> list[str]:
    median, sigma, floor = LENGTHS[kind]
    rng = np.random.default_rng(seed)
    tokens = np.maximum(rng.lognormal(np.log(median), sigma, num_docs), floor)
    words, p = word_distribution()
    n_words = np.maximum(1, (tokens / TOKENS_PER_WORD).astype(int))
    draws = rng.choice(len(words), size=int(n_words.sum()), p=p)
    out, start = [], 0
    for n in n_words:
        out.append(" ".join(words[i] for i in draws[start: start + n]))
        start += n
    return out


def make_tokenizer(args: argparse.Namespace):
    from transformers import PreTrainedTokenizerFast

    if args.tokenizer:
        from omegaconf import OmegaConf

        return data.get_tokenizer(OmegaConf.create(
            {"data": {"name": "bench", "tokenizer_name_or_path": args.tokenizer,
                      "cache_dir": None}}))
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(data.embedded_corpus_documents("train"), vocab_size=args.vocab_size,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", choices=sorted(LENGTHS), default="owt")
    p.add_argument("--num-docs", type=int, default=10_000, help="stand-in documents")
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="worker counts")
    p.add_argument("--length", type=int, default=None, help="model.length (owt 1024, lm1b 128)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer name/path instead of the BPE")
    p.add_argument("--vocab-size", type=int, default=50257, help="vocabulary of the trained BPE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    # one thread per worker process, so that N processes use N cores: the tokenizers library
    # would otherwise parallelise a single in-process worker over every core (and disables
    # that in forked workers), which confounds the scaling with N
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    logging.basicConfig(level=logging.WARNING)
    import datasets
    from omegaconf import OmegaConf

    datasets.disable_progress_bars()
    length = args.length or (1024 if args.corpus == "owt" else 128)
    texts = synthetic_corpus(args.corpus, args.num_docs, args.seed)
    tokenizer = make_tokenizer(args)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), f"{tmp}/corpus.parquet")
        raw = datasets.load_dataset("parquet", data_files=f"{tmp}/corpus.parquet", split="train",
                                    cache_dir=f"{tmp}/hf")
        for num_proc in args.num_proc:
            cfg = OmegaConf.create({
                "hf_path": "bench", "text_column": "text", "map_batch_size": 1000,
                "num_proc": num_proc, "wrap": True, "wrap_bos_token": None,
                "wrap_eos_token": None, "bos_per_document": False,
                "detokenizer": "lm1b" if args.corpus == "lm1b" else None})
            began = time.perf_counter()
            out = hub.tokenize_split(raw, cfg, tokenizer, length, f"bench/{num_proc}")
            seconds = time.perf_counter() - began
            stats = hub.split_stats(len(raw), out)
            rate = len(raw) / seconds
            full = FULL_DOCUMENTS[args.corpus] / rate
            row = {"corpus": args.corpus, "num_proc": num_proc, "documents": len(raw),
                   "seconds": round(seconds, 2), "docs_per_s": round(rate),
                   "tokens_per_doc": round(stats["tokens"] / len(raw), 1),
                   "blocks": stats["blocks"], "full_corpus_minutes": round(full / 60, 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
