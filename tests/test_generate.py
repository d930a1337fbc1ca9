"""models.generate (Python entry point, prompt/infill parsing) and main's mode=generate."""

from __future__ import annotations

import json

import pytest
import torch

import data
from data.synthetic import SyntheticTokenizer
from flow.sampling import initial_state, sample_euler
from flow.schedule import AlphaGammaTable
from models import generate
from models.dit import DiT
from models.generate import infill_known, parse_infill, prompt_known
from runtime.config import ConfigError
from tests.helpers import compose_config
from tests.test_main import TINY, run_main

EPS = 1e-5


def dit(vocab=11, length=7, double_temb=False, seed=0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(vocab, length, 16, n_blocks=1, n_heads=2, cond_dim=8, dropout=0.0,
                double_temb=double_temb)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def test_prompt_prefix_is_the_clamped_euler_sampler():
    """generate(backbone, prompt) = sample_euler with the prompt as known prefix, rows of one
    prompt consecutive; the known positions are the prompt."""
    model = dit()
    prompt = [3, 1, 4]
    out = generate(model, prompt, steps=5, num_samples=6,
                   generator=torch.Generator().manual_seed(2))
    known = torch.zeros(6, 7, dtype=torch.long)
    known[:, :3] = torch.tensor(prompt)
    mask = torch.zeros(6, 7, dtype=torch.bool)
    mask[:, :3] = True
    noise = initial_state(model, 6, 7, torch.Generator().manual_seed(2))
    expected = sample_euler(model, AlphaGammaTable(11), noise, 5, EPS, known_tokens=known,
                            known_mask=mask)
    assert torch.equal(out, expected)
    assert (out[:, :3] == torch.tensor(prompt)).all()
    batched = generate(model, [[3, 1, 4], [0, 0, 2]], steps=5, num_samples=2,
                       generator=torch.Generator().manual_seed(2))
    assert batched[:2, :3].tolist() == [[3, 1, 4]] * 2
    assert batched[2:, :3].tolist() == [[0, 0, 2]] * 2


@pytest.mark.parametrize("kind", ["fmlm", "stage1"])
def test_infill_with_fmlm_and_stage_one(kind):
    """FMLM gets (t_i, t_{i+1}); stage 1 runs teacher + student; the known positions hold."""
    length = 7
    mask = torch.tensor([True, False, False, True, False, True, True])
    tokens = torch.tensor([5, 0, 0, 2, 0, 9, 1])
    seen = []
    if kind == "fmlm":
        backbone, teacher = dit(double_temb=True), None
        features = backbone.features

        def recording(h, t, t2=None):
            seen.append(t2 is not None)
            return features(h, t, t2)

        backbone.features = recording
    else:
        backbone, teacher = dit(double_temb=True, seed=1), dit(seed=2)
    out = generate(backbone, tokens, mask, steps=2, num_samples=5, teacher=teacher,
                   length=length, generator=torch.Generator().manual_seed(0))
    assert out.shape == (5, length)
    assert torch.equal(out[:, mask], tokens[mask].expand(5, -1))
    if kind == "fmlm":
        assert seen == [True, True]


def test_bad_python_inputs_fail_clearly():
    model = dit()
    with pytest.raises(ValueError, match="longer|model.length"):
        generate(model, list(range(8)), steps=1)
    with pytest.raises(ValueError, match="same shape"):
        generate(model, [1, 2], [True, False], steps=1)
    with pytest.raises(ValueError, match="without prompt_ids"):
        generate(model, None, [True] * 7, steps=1)
    with pytest.raises(ValueError, match="two_times=True with a teacher"):
        generate(dit(double_temb=True), teacher=model, two_times=True, steps=1)


def test_infill_template_parsing():
    assert parse_infill("The [MASK:3] sat. [MASK:2]") == ["The", 3, " sat.", 2]
    tok = SyntheticTokenizer(20)
    tokens, mask = infill_known(tok, parse_infill("t4 [MASK:2] t7 t8 [MASK:1] t3"), 10)
    assert tokens[mask].tolist() == [4, 7, 8, 3]
    assert mask.tolist() == [True, False, False, True, True, False, True, False, False, False]
    tokens, mask = prompt_known(tok, "t1 t2", 4)
    assert tokens[mask].tolist() == [1, 2] and mask.tolist() == [True, True, False, False]


@pytest.mark.parametrize("template, message", [
    ("", "is empty"), ("   ", "is empty"), ("t1 t2", "no placeholder"),
    ("t1 [MASK] t2", "unknown placeholder"), ("t1 [FILL:3]", "unknown placeholder"),
    ("t1 [MASK:0]", "unknown placeholder"), ("t1 [MASK:x]", "unknown placeholder")])
def test_bad_infill_is_one_clear_error(template, message):
    with pytest.raises(ConfigError, match=message):
        parse_infill(template)


def test_too_long_prompt_or_infill_is_one_clear_error():
    tok = SyntheticTokenizer(20)
    with pytest.raises(ConfigError, match="generate.prompt=.*longer than model.length=3"):
        prompt_known(tok, "t1 t2 t3 t4", 3)
    with pytest.raises(ConfigError, match="generate.infill needs 6 tokens"):
        infill_known(tok, parse_infill("t1 [MASK:4] t2"), 5)
    with pytest.raises(ConfigError, match="generate.add_bos=true"):
        prompt_known(tok, "t1", 3, add_bos=True)


def test_cli_generate_prompt_and_infill(tmp_path):
    """mode=generate on a checkpoint main trained for a few steps: the JSON holds the
    settings and samples whose known positions are [BOS] + the prompt's tokens."""
    run = tmp_path / "run"
    trained = run_main(TINY + ["trainer.max_steps=4", "sampling.print_samples=0",
                               f"hydra.run.dir={run}"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    tokenizer = data.get_tokenizer(compose_config([]))
    prompt = "the history of the city"
    expected = [tokenizer.bos_token_id,
                *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    out = tmp_path / "prompt.json"
    proc = run_main(TINY + ["mode=generate", f"eval.checkpoint_path={ckpt}",
                            f"generate.prompt='{prompt}'", "generate.num_samples=3",
                            "sampling.steps=[2]", "sampling.batch_size=2",
                            f"generate.output_path={out}", f"hydra.run.dir={tmp_path / 'g1'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["prompt"] == prompt and result["settings"]["steps"] == [2]
    assert len(result["samples"]) == 3
    for sample in result["samples"]:
        assert sample["token_ids"][:len(expected)] == expected
        assert len(sample["token_ids"]) == 32
        assert sample["text"] in proc.stdout

    infill = "the [MASK:4] of the [MASK:3]"
    out = tmp_path / "infill.json"
    proc = run_main(TINY + ["mode=generate", f"eval.checkpoint_path={ckpt}",
                            f"generate.infill='{infill}'", "generate.num_samples=2",
                            "sampling.steps=[1]", f"generate.output_path={out}",
                            f"hydra.run.dir={tmp_path / 'g2'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    the, of_the = (tokenizer(t, add_special_tokens=False)["input_ids"]
                   for t in ("the", " of the"))
    known = [tokenizer.bos_token_id, *the, *[None] * 4, *of_the, *[None] * 3]
    for sample in json.loads(out.read_text())["samples"]:
        assert sample["known_mask"][:len(known)] == [k is not None for k in known]
        assert not any(sample["known_mask"][len(known):])
        assert [t for t, k in zip(sample["token_ids"], known) if k is not None] == \
            [k for k in known if k is not None]



def in_process_generate(tmp_path, monkeypatch, overrides):
    """main.generate_text with load_for_eval replaced by a fresh tiny FLM (no checkpoint)."""
    import algo
    import main
    from runtime.config import resolve_config
    config = resolve_config(compose_config(TINY + ["mode=generate", "eval.checkpoint_path=x",
                                                   f"generate.output_path={tmp_path / 'g.json'}",
                                                   *overrides], run_dir=str(tmp_path)))
    tokenizer = data.get_tokenizer(config)

    def fake_load(cfg):
        return algo.FLM(cfg, vocab_size=len(tokenizer), tokenizer=tokenizer).eval(), tokenizer

    monkeypatch.setattr(main, "load_for_eval", fake_load)
    main.generate_text(config)
    return json.loads((tmp_path / "g.json").read_text()), tokenizer


def test_prompt_file_gives_each_prompt_its_samples(tmp_path, monkeypatch):
    prompts = ["the city", "a history of music in the"]
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(prompts) + "\n")
    result, tokenizer = in_process_generate(tmp_path, monkeypatch, [
        f"generate.prompt_file={file}", "generate.num_samples=3", "sampling.batch_size=2",
        "sampling.steps=[1,2]"])
    samples = result["samples"]
    assert len(samples) == 2 * 2 * 3  # step counts x prompts x samples
    for sample in samples:
        text = prompts[sample["condition"]]
        assert sample["condition_text"] == text
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        assert sample["token_ids"][:len(ids)] == ids
        assert sample["known_mask"] == [True] * len(ids) + [False] * (32 - len(ids))
    unconditional, _ = in_process_generate(tmp_path, monkeypatch, ["generate.num_samples=2"])
    assert [s["known_mask"] for s in unconditional["samples"]] == [None, None]


def test_bad_generate_settings_fail_before_loading(tmp_path, monkeypatch):
    file = tmp_path / "prompts.txt"
    file.write_text("one\n\nthree\n")
    with pytest.raises(ConfigError, match="empty lines \\[2\\]"):
        in_process_generate(tmp_path, monkeypatch, [f"generate.prompt_file={file}"])
    with pytest.raises(ConfigError, match="give one of"):
        in_process_generate(tmp_path, monkeypatch, ["generate.prompt=a",
                                                    "generate.infill='b [MASK:2]'"])
    with pytest.raises(ConfigError, match="longer than model.length=32"):
        in_process_generate(tmp_path, monkeypatch, ["generate.prompt='" + "word " * 40 + "'"])
