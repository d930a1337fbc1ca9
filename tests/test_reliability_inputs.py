"""Inputs that crashed deep inside a run: synthetic-source settings and model.length are one
ConfigError naming the key before any work; generation checks its inputs before sampling."""

from __future__ import annotations

import importlib

import pytest

import data
from algo import resolve_config
from runtime.config import ConfigError
from tests.helpers import TINY_MODEL, compose_config


@pytest.mark.parametrize("overrides, message", [
    (["model.length=0"], "model.length=0: give the sequence length in tokens, >= 1"),
    (["model.length=-4"], "model.length=-4: give the sequence length in tokens, >= 1"),
    (["model.length=0", "data=synthetic"], "model.length=0: give the sequence length"),
    (["model.length=2"], "model.length=2: a block of text data=embedded is \\[BOS\\] content "
                         "\\[EOS\\]; use model.length >= 3"),
    (["model.length=2", "data=openwebtext-split"], "model.length=2: a block of text "
                                                   "data=openwebtext"),
    (["data=synthetic", "data.vocab_size=-5"], "data.vocab_size=-5: the source needs"),
    (["data=synthetic", "data.vocab_size=1"], "data.vocab_size=1: the source needs"),
    (["data=synthetic", "data.train_size=-10"], "data.train_size=-10: give a number of training"),
    (["data=synthetic", "data.train_size=0"], "data.train_size=0: give a number of training"),
    (["data=synthetic", "data.source_seed=-1"], "data.source_seed=-1: the seed of the source"),
    (["data=synthetic", "data.valid_size=0"], "data.valid_size=0: give a number of validation"),
])
def test_bad_length_and_synthetic_settings_are_one_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(compose_config(overrides))


@pytest.mark.parametrize("overrides", [["data=synthetic", "model.length=2"],
                                       ["data=synthetic", "model.length=1"],
                                       ["model.length=3"]])
def test_smallest_lengths_that_work_pass(overrides):
    resolve_config(compose_config(overrides))


def test_synthetic_builders_refuse_the_same_settings():
    """The datasets' own builder applies the same rules (callers outside main)."""
    from data import synthetic
    config = compose_config(["data=synthetic", "data.train_size=-10"])
    with pytest.raises(ValueError, match="data.train_size=-10"):
        synthetic.make_datasets(config.data, 8)


# --------------------------------------------------------------------------- generation

TINY = [*TINY_MODEL, "loader.global_batch_size=8", "sampling.steps=[1]", "trainer.accelerator=cpu"]


def _generate(tmp_path, monkeypatch, overrides: list[str]) -> None:
    """main.generate_text with a fresh tiny FLM for the checkpoint and the sampler replaced by
    a failure: an input error must come before any sampling."""
    import algo
    import main

    config = resolve_config(compose_config(
        TINY + ["mode=generate", "eval.checkpoint_path=x", *overrides], run_dir=str(tmp_path)))
    tokenizer = data.get_tokenizer(config)

    def fake_load(cfg):
        return algo.FLM(cfg, vocab_size=len(tokenizer), tokenizer=tokenizer).eval(), tokenizer

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the inputs were checked")

    monkeypatch.setattr(main, "load_for_eval", fake_load)
    # the module (models/__init__ exports the function under the same name)
    monkeypatch.setattr(importlib.import_module("models.generate"), "generate", no_sampling)
    main.generate_text(config)


def test_unwritable_output_path_fails_before_sampling(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"generate.output_path={blocker}/out.json cannot be "
                                          "written"):
        _generate(tmp_path, monkeypatch, [f"generate.output_path={blocker}/out.json"])
    with pytest.raises(ConfigError, match=f"generate.output_path={tmp_path} is a directory"):
        _generate(tmp_path, monkeypatch, [f"generate.output_path={tmp_path}"])


def test_empty_prompt_fails_before_sampling(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="generate.prompt is empty"):
        _generate(tmp_path, monkeypatch, ["generate.prompt=''",
                                          f"generate.output_path={tmp_path}/g.json"])


@pytest.mark.parametrize("key, value", [("prompt", "'the city'"),
                                        ("infill", "'the [MASK:2] city'")])
def test_text_prompt_on_synthetic_data_names_the_key(tmp_path, monkeypatch, key, value):
    with pytest.raises(ConfigError, match=f"generate.{key}=.*'the' is not a synthetic token"):
        _generate(tmp_path, monkeypatch, ["data=synthetic", f"generate.{key}={value}",
                                          f"generate.output_path={tmp_path}/g.json"])
