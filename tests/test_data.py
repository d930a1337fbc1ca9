"""Packing, detokenisation, the embedded corpus, the Hub cache path and its offline error."""

import itertools
import json
import random

import pytest
import torch
from omegaconf import OmegaConf

import data as D

LENGTH = 64


def make_config(tmp_path, **data_overrides):
    data = OmegaConf.load(D.REPO_ROOT / "configs" / "data" / "embedded.yaml")
    data = OmegaConf.merge(data, {"cache_dir": str(tmp_path / "cache"), **data_overrides})
    return OmegaConf.create({
        "data": data, "model": {"length": LENGTH}, "seed": 0,
        "loader": {"batch_size": 4, "eval_batch_size": 4, "num_workers": 0, "pin_memory": False},
    })


def hub_overrides(**extra):
    return {"name": "lm1b", "hf_path": "lm1b", "hf_config": None, "hf_revision": None,
            "text_column": "text", "train": "train", "valid": "test", "detokenizer": "lm1b",
            **extra}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("embedded"))
    tokenizer = D.get_tokenizer(config)
    train, valid = D.get_datasets(config, tokenizer)
    return config, tokenizer, train, valid


# --------------------------------------------------------------------------- packing


def test_pack_sequences_hand_example():
    docs = [[10, 11, 12], [13], [14, 15, 16, 17, 18]]
    # stream: 0 10 11 12 1 | 0 13 1 0 14 15 16 | 17 18 1 (tail < 4 dropped); chunks of 6 - 2 = 4
    expected = [[0, 0, 10, 11, 12, 1],
                [0, 1, 0, 13, 1, 1],
                [0, 0, 14, 15, 16, 1]]
    assert D.pack_sequences(docs, 6, bos_id=0, eos_id=1) == expected


def test_pack_sequences_loses_and_duplicates_nothing():
    rng = random.Random(0)
    bos, eos, length = 0, 1, 9
    docs = [[rng.randrange(2, 50) for _ in range(rng.randrange(0, 30))] for _ in range(40)]
    blocks = D.pack_sequences(docs, length, bos, eos)
    stream = list(itertools.chain.from_iterable([bos, *d, eos] for d in docs))
    assert all(len(b) == length and b[0] == bos and b[-1] == eos for b in blocks)
    interior = list(itertools.chain.from_iterable(b[1:-1] for b in blocks))
    assert interior == stream[: len(interior)]
    assert 0 <= len(stream) - len(interior) < length - 2  # only the incomplete tail is dropped


def test_pad_sequences_hand_example():
    ids, mask = D.pad_sequences([[5, 6], [7, 8, 9, 10, 11]], 5, bos_id=0, eos_id=1, pad_id=2)
    assert ids == [[0, 5, 6, 1, 2], [0, 7, 8, 9, 1]]
    assert mask == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


# --------------------------------------------------------------------------- detokeniser


# expected outputs derived by hand from the paper's LM1B rules (data/detokenize.py docstring):
# no n't rule, no % rule, " / " -> "/", a period after ")" keeps its space, and the period
# rule needs a space before the word (so "a . b . c" only joins the second period)
@pytest.mark.parametrize("raw, clean", [
    ("I do n't think it 's over , he said .", "I do n't think it's over, he said."),
    ('He said " hello there " ( quietly ) .', 'He said "hello there" (quietly) .'),
    ("Prices rose 50 % to $ 12 ; see http : / / example.com now ?",
     "Prices rose 50 % to $12; see http://example.com now?"),
    ("They 've gone : we 'll follow and / or wait !", "They've gone: we'll follow and/or wait!"),
    ("He paid £ 5 . Then he left .", "He paid £5. Then he left."),
    ("a . b . c", "a . b. c"),
    ("the ' quoted ' word [ sic ]", "the 'quoted' word [sic]"),
])
def test_lm1b_detokenizer(raw, clean):
    assert D.detokenize("lm1b", [raw]) == [clean]


def test_detokenize_identity_and_unknown():
    assert D.detokenize(None, ["a , b"]) == ["a , b"]
    with pytest.raises(ValueError, match="data.detokenizer"):
        D.detokenize("wikitext-typo", ["x"])


# --------------------------------------------------------------------------- embedded corpus


def test_embedded_loads_offline_and_round_trips(embedded, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    config, tokenizer, train, valid = embedded
    assert len(tokenizer) == config.data.tokenizer_vocab_size
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for ds in (train, valid):
        ids = ds.input_ids
        assert ids.shape[1] == LENGTH and ds.attention_mask.all()
        assert (ids[:, 0] == bos).all() and (ids[:, -1] == eos).all()
    # block interiors, concatenated, are the token stream of the documents: decode the first
    # blocks (dropping the document's own leading BOS) and compare with the raw text
    first_doc = D.embedded_corpus_documents("train")[0]
    interior = train.input_ids[:5, 1:-1].reshape(-1).tolist()
    assert interior[0] == bos
    decoded = tokenizer.decode(interior[1:])
    assert len(decoded) > 500 and first_doc.startswith(decoded)
    # and a fresh encode/decode of held-out text is lossless
    text = D.embedded_corpus_documents("valid")[0][:2000]
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_embedded_splits_disjoint():
    train_docs, valid_docs = (D.embedded_corpus_documents(s) for s in ("train", "valid"))
    assert train_docs and valid_docs and not set(train_docs) & set(valid_docs)
    total = sum(map(len, train_docs)) + sum(map(len, valid_docs))
    assert 0.02 < sum(map(len, valid_docs)) / total < 0.15
    with pytest.raises(ValueError, match="split"):
        D.embedded_corpus_documents("test")


def test_embedded_batch_format(embedded):
    config, tokenizer, train, _ = embedded
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=3)))
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (3, LENGTH) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long


def test_tokenizer_vocab_mismatch_is_reported(tmp_path):
    config = make_config(tmp_path, tokenizer_vocab_size=4096)
    with pytest.raises(ValueError, match="prepare_embedded_corpus"):
        D.get_tokenizer(config)


# --------------------------------------------------------------------------- Hub path


def test_missing_cache_offline_names_dataset_and_directory(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read these variables at import; mirror what a user's shell would have set
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = make_config(tmp_path, **hub_overrides())
    tokenizer = D.get_tokenizer(make_config(tmp_path))
    with pytest.raises(D.DataCacheMissingError) as err:
        D.get_datasets(config, tokenizer)
    message = str(err.value)
    assert "'lm1b'" in message and str(tmp_path / "cache") in message
    assert "prepare_data.py" in message


def test_hub_path_builds_then_reuses_cache(tmp_path, embedded):
    """A local JSON-lines folder stands in for the Hub: same load_dataset/map/save code path."""
    _, tokenizer, _, _ = embedded
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    rng = random.Random(1)
    words = ["the", "king", "'s", "horse", ",", "do", "n't", "run", "."]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randrange(3, 25))) for _ in range(50)]
    (raw_dir / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    config = make_config(tmp_path, **hub_overrides(hf_path=str(raw_dir), train="train[:40]",
                                                   valid="train[40:]", num_proc=1,
                                                   map_batch_size=16))
    train, valid = D.get_datasets(config, tokenizer)
    # independent computation: detokenise + tokenise + pack each map batch of 16 documents
    expected = []
    for start in range(0, 40, 16):
        chunk = D.detokenize("lm1b", texts[start: min(start + 16, 40)])
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in chunk]
        expected += D.pack_sequences(ids, LENGTH, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert train[: len(train)]["input_ids"].tolist() == expected
    assert len(valid) > 0
    cache = D.cache_path(config.data, "train[:40]", LENGTH)
    assert cache.is_dir() and "lm1b" in cache.name and f"L{LENGTH}" in cache.name
    # the raw data is gone: the second call must come from the cache
    (raw_dir / "data.jsonl").unlink()
    again, _ = D.get_datasets(config, tokenizer)
    assert torch.equal(again[: len(again)]["input_ids"], train[: len(train)]["input_ids"])


def test_hub_tokenizer_offline_error_names_key(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # nothing cached there
    config = make_config(tmp_path, tokenizer_name_or_path="no-such-org/no-such-tokenizer")
    with pytest.raises(OSError, match="data.tokenizer_name_or_path"):
        D.get_tokenizer(config)


def test_synthetic_branch_dispatches_to_the_synthetic_module(tmp_path, monkeypatch):
    import types

    calls = []
    fake = types.ModuleType("synthetic")
    fake.make_tokenizer = lambda data: calls.append(("tok", data.name)) or "TOKENIZER"
    fake.make_datasets = lambda data, length: calls.append(("ds", length)) or ("TRAIN", "VALID")
    monkeypatch.setattr(D.tokenizers, "synthetic", fake)
    monkeypatch.setattr(D.module, "synthetic", fake)
    config = make_config(tmp_path, name="synthetic")
    assert D.get_tokenizer(config) == "TOKENIZER"
    assert D.get_datasets(config, "TOKENIZER") == ("TRAIN", "VALID")
    assert calls == [("tok", "synthetic"), ("ds", LENGTH)]


# --------------------------------------------------------------------------- paper wrap layout


def test_pack_sequences_paper_layout_hand_example():
    # paper layout: `doc EOS` per document (no BOS), BOS = EOS = 5 as LM1B's [CLS]
    docs = [[10, 11, 12], [13], [14, 15, 16, 17, 18]]
    # stream: 10 11 12 5 | 13 5 14 15 | 16 17 18 5 ; chunks of 6 - 2 = 4, nothing left over
    expected = [[5, 10, 11, 12, 5, 5],
                [5, 13, 5, 14, 15, 5],
                [5, 16, 17, 18, 5, 5]]
    assert D.pack_sequences(docs, 6, bos_id=5, eos_id=5, bos_per_document=False) == expected


WORDS = ["the", "king", "horse", "runs", "far", "and", "wide", "a", "day", "night"]


def word_tokenizer(specials, **roles):
    """A whole-word tokenizer over WORDS plus ``specials`` (ids 0.. in that order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **roles), vocab


def paper_data_config(name):
    return OmegaConf.load(D.REPO_ROOT / "configs" / "data" / f"{name}.yaml")


def direct_paper_blocks(texts, vocab, length, separator):
    """Independent construction: ``doc SEP`` per document, chunks of length-2 framed by SEP."""
    stream = []
    for text in texts:
        stream += [vocab[w] for w in text.split()] + [separator]
    chunk = length - 2
    return [[separator, *stream[i: i + chunk], separator]
            for i in range(0, len(stream) - chunk + 1, chunk)]


def test_lm1b_wrap_uses_cls_as_bos_and_eos():
    from data.tokenizers import _set_specials

    tok, vocab = word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], cls_token="[CLS]",
                                sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")
    tok = _set_specials(tok)  # BERT: BOS = [CLS], EOS = [SEP] for the tokenizer itself
    data = paper_data_config("lm1b-wrap")
    bos, eos = D.wrap_ids(tok, data)
    assert (bos, eos) == (vocab["[CLS]"], vocab["[CLS]"])
    rng = random.Random(2)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 9))) for _ in range(30)]
    out = D.tokenize_and_block(texts, tok, 8, True, data.detokenizer, bos, eos,
                               data.bos_per_document)
    assert out["input_ids"] == direct_paper_blocks(texts, vocab, 8, vocab["[CLS]"])
    assert all(vocab["[SEP]"] not in block for block in out["input_ids"])


def test_openwebtext_wrap_has_one_endoftext_between_documents():
    eot = "<|endoftext|>"
    tok, vocab = word_tokenizer(["[UNK]", eot], bos_token=eot, eos_token=eot)
    data = paper_data_config("openwebtext-split")
    bos, eos = D.wrap_ids(tok, data)
    assert bos == eos == vocab[eot]
    texts = ["the king runs", "a day", "and wide far night", "the horse"]
    out = D.tokenize_and_block(texts, tok, 5, True, data.detokenizer, bos, eos,
                               data.bos_per_document)
    assert out["input_ids"] == direct_paper_blocks(texts, vocab, 5, vocab[eot])
    interior = [t for block in out["input_ids"] for t in block[1:-1]]
    assert all(not (a == b == vocab[eot]) for a, b in zip(interior, interior[1:]))


def test_wrap_token_not_in_vocabulary_is_reported():
    tok, _ = word_tokenizer(["[UNK]", "[BOS]", "[EOS]"], bos_token="[BOS]", eos_token="[EOS]")
    with pytest.raises(ValueError, match="data.wrap_bos_token='\\[CLS\\]'"):
        D.wrap_ids(tok, OmegaConf.create({"wrap_bos_token": "[CLS]", "wrap_eos_token": None}))
