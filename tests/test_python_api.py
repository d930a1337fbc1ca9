"""The Python API a user reaches after the README's set-up: ``generate_text`` (text through the
checkpoint's own tokenizer, refusals before any sampling) and ``dataloader`` (the data entry
point, delegating to ``data/``). The README's own example runs in tests/test_readme_commands.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import data
import dataloader
from models import generate, generate_text
from models.generate import prompt_known
from models.load import BackboneSettings, build_from_settings
from runtime.config import ConfigError
from tests.helpers import TINY_MODEL, compose_config


@pytest.fixture(scope="module")
def tiny():
    """A randomly initialised tiny FLM backbone whose settings carry a saved config with the
    embedded corpus's tokenizer, as ``load_backbone`` returns for this project's checkpoints."""
    config = compose_config(TINY_MODEL)
    tokenizer = data.get_tokenizer(config)
    model = config.model
    settings = BackboneSettings(
        vocab_size=len(tokenizer), length=int(model.length), hidden_size=int(model.hidden_size),
        n_blocks=int(model.n_blocks), n_heads=int(model.n_heads), cond_dim=int(model.cond_dim),
        mlp_ratio=int(model.mlp_ratio), double_temb=False, algo="flm", dropout=0.0,
        attn_softcap=float(model.attn_softcap), causal=False, source="project",
        saved_config=config)
    torch.manual_seed(0)
    return build_from_settings(settings).eval(), settings, tokenizer


def test_generate_text_is_generate_then_the_checkpoints_tokenizer(tiny):
    backbone, settings, tokenizer = tiny
    texts = generate_text(backbone, settings, "To be, or", steps=3, num_samples=2,
                          generator=torch.Generator().manual_seed(5))
    known, mask = prompt_known(tokenizer, "To be, or", settings.length)
    tokens = generate(backbone, known, mask, steps=3, num_samples=2,
                      generator=torch.Generator().manual_seed(5))
    assert texts == [tokenizer.decode(row, skip_special_tokens=True) for row in tokens]
    assert all(text.startswith("To be, or") for text in texts)  # the prompt is kept


def test_a_stage1_map_without_its_teacher_is_refused(tiny):
    backbone, settings, _ = tiny
    stage1 = dataclasses.replace(settings, algo="flm_distill", double_temb=True)
    with pytest.raises(ConfigError, match="teacher="):
        generate_text(build_from_settings(stage1).eval(), stage1, "To be", steps=1)


@pytest.mark.parametrize("algo", ["mdlm", "ar"])
def test_baselines_are_sent_to_mode_generate(tiny, algo):
    backbone, settings, _ = tiny
    with pytest.raises(ConfigError, match="mode=generate"):
        generate_text(backbone, dataclasses.replace(settings, algo=algo), steps=1)


def test_a_checkpoint_without_its_data_asks_for_a_tokenizer(tiny):
    backbone, settings, tokenizer = tiny
    paper = dataclasses.replace(settings, source="paper-hub", saved_config=None)
    with pytest.raises(ConfigError, match="tokenizer="):
        generate_text(backbone, paper, steps=1)
    texts = generate_text(backbone, paper, steps=1, tokenizer=tokenizer,
                          generator=torch.Generator().manual_seed(0))
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_dataloader_reexports_data_and_builds_the_training_sets():
    for name in dataloader.__all__:
        assert getattr(dataloader, name) is getattr(data, name)  # delegation, no second copy
    config = compose_config(TINY_MODEL)
    tokenizer = dataloader.get_tokenizer(config)
    train, valid = dataloader.get_datasets(config, tokenizer)
    item = train[0]
    assert item["input_ids"].shape == (config.model.length,)
    assert int(item["input_ids"].max()) < len(tokenizer) and len(valid) > 0
