"""Hub path with a local stand-in for the Hub: the parquet retry, split slicing and the held-out
tail, the split-size check, the cache manifest and its refusals, chunked tokenisation, and the
offline tokenizer error."""

import json
import logging
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

import data as D
from data import hub

LENGTH = 16
N_DOCS = 50
SCRIPT_ERROR = "Dataset scripts are no longer supported, but found openwebtext.py"
WORDS = ["the", "king", "horse", "runs", "far", "and", "wide", "a", "day", "night", "sea"]


def corpus_texts(n=N_DOCS):
    # document i is identifiable: its word count is 1 + i % 11, its words rotate with i
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 11)) for i in range(n)]


@pytest.fixture
def parquet_hub(tmp_path, monkeypatch):
    """A tiny parquet dataset on disk, served by a `load_dataset` stand-in that raises the
    datasets>=4 script error unless asked for the parquet revision."""
    import datasets

    folder = tmp_path / "hub" / "plain_text" / "train"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"text": corpus_texts()}), folder / "0000.parquet")
    calls = []

    def fake_load(path, name, split, revision, data_dir=None):
        calls.append((path, name, split, revision, data_dir))
        if revision != D.PARQUET_REVISION:
            raise RuntimeError(SCRIPT_ERROR)
        files = sorted(str(f) for f in (tmp_path / "hub" / data_dir / split).glob("*.parquet"))
        return datasets.load_dataset("parquet", data_files={split: files}, split=split,
                                     cache_dir=str(tmp_path / "hf_cache"))

    monkeypatch.setattr(hub, "_load_dataset", fake_load)
    return calls


def make_config(tmp_path, **data_overrides):
    base = OmegaConf.load(D.REPO_ROOT / "configs" / "data" / "openwebtext-split.yaml")
    embedded = OmegaConf.load(D.REPO_ROOT / "configs" / "data" / "embedded.yaml")
    data = OmegaConf.merge(base, {
        "hf_path": "Skylion007/openwebtext", "hf_revision": None, "hf_split_sizes": None,
        "train": "train[:-10]", "valid": "train[-10:]", "num_proc": 1, "map_batch_size": 4,
        "tokenizer_name_or_path": embedded.tokenizer_name_or_path,
        "tokenizer_vocab_size": embedded.tokenizer_vocab_size,
        "cache_dir": str(tmp_path / "cache"), **data_overrides})
    return OmegaConf.create({"data": data, "model": {"length": LENGTH}, "seed": 0})


@pytest.fixture(scope="module")
def tokenizer():
    embedded = OmegaConf.load(D.REPO_ROOT / "configs" / "data" / "embedded.yaml")
    return D.get_tokenizer(OmegaConf.create({"data": embedded}))


def expected_blocks(texts, tokenizer, batch, wrap=True, bos_per_document=False):
    """Independent construction: packing batches are consecutive groups of `batch` documents."""
    out = []
    for start in range(0, len(texts), batch):
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in texts[start: start + batch]]
        if wrap:
            out += D.pack_sequences(ids, LENGTH, tokenizer.bos_token_id, tokenizer.eos_token_id,
                                    bos_per_document)
        else:
            out += D.pad_sequences(ids, LENGTH, tokenizer.bos_token_id, tokenizer.eos_token_id,
                                   tokenizer.pad_token_id)[0]
    return out


# --------------------------------------------------------------------------- retry + slicing


def test_script_dataset_is_retried_on_parquet_revision(tmp_path, parquet_hub, tokenizer, caplog):
    config = make_config(tmp_path)
    with caplog.at_level(logging.WARNING, logger="data.hub"):
        train, valid = D.get_datasets(config, tokenizer)
    assert parquet_hub[:2] == [
        ("Skylion007/openwebtext", "plain_text", "train", None, None),
        ("Skylion007/openwebtext", None, "train", D.PARQUET_REVISION, "plain_text")]
    assert "retrying on its parquet revision refs/convert/parquet" in caplog.text
    texts = corpus_texts()
    # the held-out tail: the last 10 documents are validation, the rest training
    assert train[: len(train)]["input_ids"].tolist() == expected_blocks(texts[:-10], tokenizer, 4)
    assert valid[: len(valid)]["input_ids"].tolist() == expected_blocks(texts[-10:], tokenizer, 4)


def test_split_slicing_pad_layout_one_block_per_document(tmp_path, parquet_hub, tokenizer):
    config = make_config(tmp_path, wrap=False, train="train[5:20]", valid="train[-3:]",
                         hf_revision=D.PARQUET_REVISION)
    train, valid = D.get_datasets(config, tokenizer)
    texts = corpus_texts()
    assert len(train) == 15 and len(valid) == 3
    assert train[:15]["input_ids"].tolist() == expected_blocks(texts[5:20], tokenizer, 4, False)
    assert valid[:3]["input_ids"].tolist() == expected_blocks(texts[-3:], tokenizer, 4, False)
    assert all(c[3] == D.PARQUET_REVISION for c in parquet_hub)  # no failed first attempt


def test_cached_blocks_items_batches_and_token_count(tmp_path, parquet_hub, tokenizer):
    """Items, slices and batched reads of a cache agree, as int64; the manifest's token count is
    the number of attention-mask ones (padded blocks: fewer than blocks x length)."""
    config = make_config(tmp_path, wrap=False, train="train[5:20]", valid="train[-3:]",
                         hf_revision=D.PARQUET_REVISION)
    train, _ = D.get_datasets(config, tokenizer)
    whole = train[: len(train)]
    assert all(v.dtype == torch.int64 and v.shape == (len(train), LENGTH) for v in whole.values())
    item = train[3]
    assert item["input_ids"].shape == (LENGTH,)
    batch = train.__getitems__([3, 1])
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(item[key], whole[key][3])
        assert torch.equal(batch[0][key], whole[key][3]) and torch.equal(batch[1][key],
                                                                        whole[key][1])
    manifest = json.loads(D.manifest_path(D.cache_path(config.data, config.data.train, LENGTH))
                          .read_text())
    assert manifest["stats"]["tokens"] == int(whole["attention_mask"].sum())
    assert manifest["stats"]["tokens"] < len(train) * LENGTH  # some blocks are padded


def test_parse_split_rejects_percent_slices():
    assert hub.parse_split("train[:-100000]") == ("train", None, -100000)
    assert hub.parse_split("test") == ("test", None, None)
    with pytest.raises(ValueError, match="data.train/data.valid"):
        hub.parse_split("train[:10%]")


def test_parquet_retry_failure_is_one_clear_error(tmp_path, monkeypatch, tokenizer):
    def fake_load(path, name, split, revision, data_dir=None):
        if revision != D.PARQUET_REVISION:
            raise RuntimeError(SCRIPT_ERROR)
        raise FileNotFoundError("Couldn't find any data file at refs/convert/parquet")

    monkeypatch.setattr(hub, "_load_dataset", fake_load)
    with pytest.raises(D.DatasetLoadError) as err:
        D.get_datasets(make_config(tmp_path), tokenizer)
    message = str(err.value)
    for needle in ("'Skylion007/openwebtext'", "'refs/convert/parquet'", "data.hf_path",
                   "data.hf_revision", "FileNotFoundError"):
        assert needle in message
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_split_size_mismatch_is_refused(tmp_path, parquet_hub, tokenizer):
    config = make_config(tmp_path, hf_split_sizes={"train": N_DOCS + 1})
    with pytest.raises(D.DatasetLoadError, match=r"has 50 documents.*has 51.*"
                       r"data.hf_split_sizes.train"):
        D.get_datasets(config, tokenizer)
    D.get_datasets(make_config(tmp_path, hf_split_sizes={"train": N_DOCS}), tokenizer)


# --------------------------------------------------------------------------- manifest


def test_manifest_counts_and_refusals(tmp_path, parquet_hub, tokenizer):
    config = make_config(tmp_path)
    train, _ = D.get_datasets(config, tokenizer)
    path = D.cache_path(config.data, config.data.train, LENGTH)
    manifest = json.loads(D.manifest_path(path).read_text())
    texts = corpus_texts()[:-10]
    assert manifest["stats"] == {"documents": len(texts), "blocks": len(train),
                                 "tokens": len(train) * LENGTH}
    assert len(train) == len(expected_blocks(texts, tokenizer, 4))

    def refused(other_config, other_tokenizer, length=LENGTH):
        """Copy the cache to where `other_config` looks (a renamed or copied cache)."""
        target = D.cache_path(other_config.data, other_config.data.train, length)
        if target != path:
            shutil.copytree(path, target)
            shutil.copy(D.manifest_path(path), D.manifest_path(target))
        other_config.model.length = length
        with pytest.raises(D.CacheMismatchError) as err:
            D.get_datasets(other_config, other_tokenizer)
        shutil.rmtree(target) if target != path else None
        return str(err.value)

    assert "length: cache built with 16, this run uses 32" in refused(make_config(tmp_path),
                                                                      tokenizer, length=32)
    assert "wrap: cache built with True, this run uses False" in refused(
        make_config(tmp_path, wrap=False), tokenizer)
    assert "bos_per_document: cache built with False, this run uses True" in refused(
        make_config(tmp_path, bos_per_document=True), tokenizer)
    # same tokenizer name, other vocabulary (e.g. a local folder replaced)
    other, _ = _other_tokenizer()
    message = refused(make_config(tmp_path), other)
    assert "vocab_size: cache built with 2048" in message and "tokenizer_fingerprint" in message
    # no manifest at all: an older cache
    D.manifest_path(path).unlink()
    with pytest.raises(D.CacheMismatchError, match="has no manifest"):
        D.get_datasets(config, tokenizer)


def _other_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[BOS]", "[EOS]", "[PAD]", "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[PAD]", unk_token="[UNK]"), vocab


# --------------------------------------------------------------------------- chunked tokenising


def test_chunks_and_processes_do_not_change_the_blocks(tmp_path, tokenizer, caplog):
    import datasets

    texts = corpus_texts()
    raw = datasets.Dataset.from_dict({"text": texts})
    expected = expected_blocks(texts, tokenizer, 4)
    for num_proc, min_chunk in ((1, 10**6), (2, 10**6), (2, 16)):
        config = make_config(tmp_path, num_proc=num_proc)
        with caplog.at_level(logging.INFO, logger="data.hub"):
            out = hub.tokenize_split(raw, config.data, tokenizer, LENGTH, "t", min_chunk)
        assert out["input_ids"] == expected
    # 2 processes x batches of 4 -> chunks of 16: three of them, then the last 2 documents
    for done in ("16/50", "32/50", "48/50", "50/50"):
        assert f"{done} documents tokenised" in caplog.text
    assert "ETA" in caplog.text


# --------------------------------------------------------------------------- tokenizer offline


def test_offline_tokenizer_is_one_error_naming_how_to_prepare(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    config = make_config(tmp_path, tokenizer_name_or_path="bert-base-uncased",
                         tokenizer_vocab_size=None)
    with pytest.raises(D.TokenizerUnavailableError) as err:
        D.get_tokenizer(config)
    message = str(err.value)
    for needle in ("'bert-base-uncased'", "data.tokenizer_name_or_path", "prepare_data.py",
                   str(tmp_path / "cache" / "tokenizers" / "bert-base-uncased")):
        assert needle in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # one traceback


def test_tokenizer_saved_next_to_cache_loads_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from data.tokenizers import saved_tokenizer_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = make_config(tmp_path, tokenizer_name_or_path="someorg/some-tokenizer",
                         tokenizer_vocab_size=None)
    other, vocab = _other_tokenizer()
    other.save_pretrained(str(saved_tokenizer_dir(config.data)))
    loaded = D.get_tokenizer(config)
    assert loaded.get_vocab() == other.get_vocab() and loaded.bos_token_id == vocab["[BOS]"]
