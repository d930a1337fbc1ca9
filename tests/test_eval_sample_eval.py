"""run_sample_eval end to end with a fake deterministic sampler and a tiny GPT-2 judge."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import matplotlib.image
import numpy as np
import pytest
import torch

from evaluation.judges import HFCausalLMJudge
from evaluation.mauve_score import MauveSettings
from evaluation.sample_eval import (
    make_decode_fn,
    run_sample_eval,
    sample_fn_from_module,
    special_token_ids,
)
from tests.test_eval_judges import WORDS, tiny_gpt2, word_tokenizer

LENGTH = 12
NUM_SAMPLES = 20
STEPS = [1, 4, 16]


def fake_sample_fn(tokenizer):
    """(steps, N, seed) -> (N, LENGTH): [BOS] words [EOS]; more steps, more distinct words."""
    word_ids = [tokenizer.get_vocab()[w] for w in WORDS]

    def sample_fn(steps: int, num_samples: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        allowed = torch.tensor(word_ids[:min(len(word_ids), 2 + 2 * steps)])
        body = allowed[torch.randint(len(allowed), (num_samples, LENGTH - 2), generator=g)]
        bos = torch.full((num_samples, 1), tokenizer.bos_token_id)
        eos = torch.full((num_samples, 1), tokenizer.eos_token_id)
        return torch.cat([bos, body, eos], dim=1)
    return sample_fn


def _run(tmp_path, name, seed, tokenizer, judge, compute_mauve=True):
    reference_ids = fake_sample_fn(tokenizer)(100, NUM_SAMPLES, 999)
    decode = make_decode_fn(tokenizer)
    return run_sample_eval(
        fake_sample_fn(tokenizer), decode, judge,
        reference_texts=decode(reference_ids), reference_ids=reference_ids,
        steps_list=STEPS, num_samples=NUM_SAMPLES, seed=seed, out_dir=str(tmp_path / name),
        model_name=f"fake-{name}", network_calls_per_step=2,
        special_ids=special_token_ids(tokenizer), compute_mauve=compute_mauve,
        mauve_settings=MauveSettings(kmeans_num_redo=1, kmeans_max_iter=20, seed=seed))


@pytest.fixture(scope="module")
def setup():
    tokenizer = word_tokenizer()
    return tokenizer, HFCausalLMJudge(tiny_gpt2(tokenizer, 8), tokenizer, batch_size=16)


def test_run_sample_eval_writes_rows_reference_plot(tmp_path, setup):
    tokenizer, judge = setup
    summary = _run(tmp_path, "a", 0, tokenizer, judge)
    out = tmp_path / "a"
    with open(out / "summary.json") as f:
        on_disk = json.load(f)
    with open(out / "samples.json") as f:
        samples = json.load(f)
    assert [row["steps"] for row in on_disk["rows"]] == STEPS
    assert on_disk["rows"] == summary["rows"]
    assert samples["seed"] == on_disk["seed"] == 0
    for row in on_disk["rows"]:
        records = samples["steps"][str(row["steps"])]
        assert len(records) == NUM_SAMPLES
        # the summary's gen PPL is the pooled one of the per-sample judge NLLs on disk
        pooled = math.exp(sum(r["judge_nll_sum"] for r in records)
                          / sum(r["judge_n_tokens"] for r in records))
        assert row["gen_ppl"] == pytest.approx(pooled, rel=1e-9)
        assert row["entropy_mean"] == pytest.approx(np.mean([r["entropy"] for r in records]))
        assert row["network_calls_per_sample"] == 2 * row["steps"]
        assert 0.0 <= row["mauve"] <= 1.0 and row["seconds_per_sample"] > 0
        # decoded text is the sample without specials: judge scores its words + EOS
        assert all(r["judge_n_tokens"] == LENGTH - 1 for r in records)
        assert records[0]["text"].split() == [tokenizer.convert_ids_to_tokens(i)
                                              for i in records[0]["token_ids"][1:-1]]
    entropies = [row["entropy_mean"] for row in on_disk["rows"]]
    assert entropies == sorted(entropies)  # the fake sampler uses more words with more steps
    reference = on_disk["reference"]
    assert reference["gen_ppl"] > 0 and reference["num_samples"] == NUM_SAMPLES
    assert len(samples["reference"]) == NUM_SAMPLES
    # protocol line, judge line, header, rule, one line per step count, reference
    assert "reference" in summary["table"] and summary["table"].count("\n") == len(STEPS) + 4
    assert on_disk["protocol"] == samples["protocol"] == "clean"
    assert summary["table"].splitlines()[:2] == ["gen-PPL protocol: clean",
                                                 f"judge: {summary['judge']}"]
    image = matplotlib.image.imread(out / "eval_plot.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # not a blank canvas


def test_same_seed_same_samples_other_seed_differs(tmp_path, setup):
    tokenizer, judge = setup
    token_ids = {}
    for name, seed in (("x", 3), ("y", 3), ("z", 4)):
        _run(tmp_path, name, seed, tokenizer, judge, compute_mauve=False)
        with open(tmp_path / name / "samples.json") as f:
            steps = json.load(f)["steps"]
        token_ids[name] = [[r["token_ids"] for r in steps[str(s)]] for s in STEPS]
    assert token_ids["x"] == token_ids["y"]
    assert token_ids["x"] != token_ids["z"]


def test_sample_fn_from_module_is_deterministic_and_batched():
    class FakeModule:
        def generate(self, num_samples, steps, generator, state_dtype):
            return torch.randint(100, (num_samples, 5), generator=generator)

    fn = sample_fn_from_module(FakeModule(), torch.float32, batch_size=3, device="cpu")
    first = fn(4, 7, 11)
    assert first.shape == (7, 5)
    assert torch.equal(first, fn(4, 7, 11))
    # batches draw in turn from one generator seeded once
    g = torch.Generator().manual_seed(11)
    expected = torch.cat([torch.randint(100, (n, 5), generator=g) for n in (3, 3, 1)])
    assert torch.equal(first, expected)


def test_overlay_script_writes_png(tmp_path, setup):
    tokenizer, judge = setup
    _run(tmp_path, "m1", 0, tokenizer, judge)
    _run(tmp_path, "m2", 1, tokenizer, judge)
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "overlay_eval_tables.py")
    spec = importlib.util.spec_from_file_location("overlay_eval_tables", path)
    overlay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overlay)
    out = tmp_path / "overlay.png"
    overlay.main([str(tmp_path / "m1" / "summary.json"), str(tmp_path / "m2" / "summary.json"),
                  "--out", str(out)])
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image[..., :3].std() > 0.01
