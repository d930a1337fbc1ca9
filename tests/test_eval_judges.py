"""Judge, MAUVE and stand-in-judge tests against independent computations (CPU, tiny models)."""

from __future__ import annotations

import importlib.util
import math
import os
import types

import pytest
import torch
from omegaconf import OmegaConf

from evaluation import judges
from evaluation.judges import HFCausalLMJudge, load_judge, make_judge, window_starts
from evaluation.mauve_score import MauveSettings, judge_features, mauve_from_features
from evaluation.metrics import generative_perplexity

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
ADJECTIVES = ["red", "big", "old", "small", "green", "quiet", "fast", "cold"]
NOUNS = ["cat", "dog", "king", "ship", "tree", "house", "river", "bird", "horse", "stone"]
VERBS = ["sees", "likes", "finds", "takes", "hears", "follows", "keeps", "leaves"]
WORDS = ["the", "a", "and", ".", *ADJECTIVES, *NOUNS, *VERBS]
REPEATED_DOC = " ".join(["the quiet king follows the green river ."] * 4)


def word_tokenizer():
    """WordLevel tokenizer over WORDS, decoding with spaces; BOS/EOS/PAD set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[PAD]", unk_token="[UNK]")


def tiny_gpt2(tokenizer, n_positions: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=32,
                        n_layer=2, n_head=2, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config).eval()


def grammar_doc(g: torch.Generator, sentences: int = 4) -> str:
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]
    out = []
    for _ in range(sentences):
        out.append(f"{pick(['the', 'a'])} {pick(ADJECTIVES)} {pick(NOUNS)} {pick(VERBS)} "
                   f"{pick(['the', 'a'])} {pick(NOUNS)} .")
    return " ".join(out)


def manual_nll(model, seq: list[int], counted: list[bool], context: int) -> tuple[float, int]:
    """Token by token, float64, one forward per target: target t is predicted from the
    tokens of its window before it, the window starting at ((t-1) // (C-1)) * (C-1)."""
    model64 = model.double()
    total, count = 0.0, 0
    with torch.no_grad():
        for t in range(1, len(seq)):
            if not counted[t]:
                continue
            start = ((t - 1) // (context - 1)) * (context - 1)
            logits = model64(input_ids=torch.tensor([seq[start:t]])).logits[0, -1]
            total -= torch.log_softmax(logits, -1)[seq[t]].item()
            count += 1
    model.float()
    return total, count


def test_window_starts_cover_every_target_once():
    for length in range(1, 40):
        for context in (2, 3, 5, 8):
            targets = [t for s in window_starts(length, context)
                       for t in range(s + 1, min(s + context, length))]
            assert sorted(targets) == list(range(1, length)), (length, context)


def test_retokenized_gen_ppl_matches_token_by_token_loop_with_chunking():
    tok = word_tokenizer()
    context = 8  # texts below are 3..30 words: many cross several windows
    model = tiny_gpt2(tok, context)
    g = torch.Generator().manual_seed(1)
    texts = [" ".join(grammar_doc(g, 5).split()[:n]) for n in (3, 7, 8, 13, 30)]
    judge = HFCausalLMJudge(model, tok, batch_size=3)
    nll_sum, n_tokens = judge.score(torch.zeros(len(texts), 1, dtype=torch.long), texts)
    total, count = 0.0, 0
    for i, text in enumerate(texts):
        words = text.split()
        seq = [tok.bos_token_id, *[tok.get_vocab()[w] for w in words], tok.eos_token_id]
        nll_i, n_i = manual_nll(model, seq, [True] * len(seq), context)
        assert n_tokens[i].item() == len(words) + 1  # text tokens + the EOS
        assert nll_sum[i].item() == pytest.approx(nll_i, rel=1e-4)
        total, count = total + nll_i, count + n_i
    assert generative_perplexity(nll_sum, n_tokens) == pytest.approx(
        math.exp(total / count), rel=1e-4)


def test_single_window_matches_hf_loss():
    tok = word_tokenizer()
    model = tiny_gpt2(tok, 64, seed=3)
    text = "the red cat sees a big dog . a cold river keeps the stone ."
    nll_sum, n_tokens = HFCausalLMJudge(model, tok, batch_size=4).score(
        torch.zeros(1, 1, dtype=torch.long), [text])
    ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"],
                         tok.eos_token_id]])
    with torch.no_grad():
        hf_mean = model(input_ids=ids, labels=ids).loss.item()
    assert (nll_sum / n_tokens).item() == pytest.approx(hf_mean, rel=1e-5)


def test_direct_ids_first_eos_counts_later_padding_does_not():
    tok = word_tokenizer()
    v = tok.get_vocab()
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    rows = [[bos, v["the"], v["cat"], eos, pad, pad, v["dog"], eos, pad],
            [bos, v["a"], v["red"], v["bird"], v["sees"], v["the"], v["tree"], v["."], v["and"]],
            [bos, eos, bos, v["a"], v["ship"], eos, eos, pad, pad]]
    expected_counted = [[0, 1, 1, 1, 0, 0, 1, 0, 0],  # first EOS, then only the real word
                        [0, 1, 1, 1, 1, 1, 1, 1, 1],  # no EOS: all targets
                        [0, 1, 0, 1, 1, 0, 0, 0, 0]]
    context = 4
    model = tiny_gpt2(tok, context, seed=5)
    judge = HFCausalLMJudge(model, tok, batch_size=2, retokenize=False, data_tokenizer=tok)
    nll_sum, n_tokens = judge.score(torch.tensor(rows), ["unused"] * 3)
    for i, (seq, counted) in enumerate(zip(rows, expected_counted)):
        nll_i, n_i = manual_nll(model, seq, [bool(c) for c in counted], context)
        assert n_tokens[i].item() == n_i == sum(counted)
        assert nll_sum[i].item() == pytest.approx(nll_i, rel=1e-4)


def test_direct_ids_need_matching_vocabularies():
    tok = word_tokenizer()
    other = word_tokenizer()
    other.add_tokens(["zebra"])
    with pytest.raises(ValueError, match="retokenize"):
        HFCausalLMJudge(tiny_gpt2(tok, 8), tok, batch_size=2, retokenize=False,
                        data_tokenizer=other)


def test_load_judge_from_local_dir_and_make_judge_dispatch(tmp_path, monkeypatch):
    tok = word_tokenizer()
    model = tiny_gpt2(tok, 16, seed=7)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    texts = ["the old horse leaves a house .", "a bird ."]
    ids = torch.zeros(2, 1, dtype=torch.long)
    expected = HFCausalLMJudge(model, tok, batch_size=2).score(ids, texts)
    cfg = OmegaConf.create({"judge": "hf", "gen_ppl_eval_model_name_or_path": str(tmp_path),
                            "perplexity_batch_size": 2, "retokenize": True,
                            "judge_dtype": "float32"})
    loaded = make_judge(cfg, None)
    assert not loaded.model.training
    got = loaded.score(ids, texts)
    torch.testing.assert_close(got[0], expected[0])
    assert torch.equal(got[1], expected[1])

    fake_oracle = types.ModuleType("evaluation.oracle")
    fake_oracle.build_oracle_judge = lambda data_cfg: ("oracle", data_cfg)
    monkeypatch.setattr(judges, "oracle", fake_oracle)
    assert make_judge(OmegaConf.create({"judge": "oracle"}), "dcfg") == ("oracle", "dcfg")
    with pytest.raises(ValueError, match="eval.judge"):
        make_judge(OmegaConf.create({"judge": "gpt9"}), None)


def test_uncached_hub_name_offline_gives_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="scripts/train_judge.py"):
        load_judge("no-such-org/no-such-judge-model")


def _load_train_judge_script():
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "train_judge.py")
    spec = importlib.util.spec_from_file_location("train_judge", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained_judge(tmp_path_factory):
    """A stand-in judge trained by scripts/train_judge.py on grammar text plus a repeated
    document (so the judge has seen the degenerate sentence), loaded back with load_judge."""
    train_judge = _load_train_judge_script()
    out = tmp_path_factory.mktemp("judge")
    tok_file = out / "tok.json"
    word_tokenizer().backend_tokenizer.save(str(tok_file))
    text_file = out / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    docs = [REPEATED_DOC if k % 4 == 0 else grammar_doc(g) for k in range(600)]
    text_file.write_text("\n\n".join(docs))
    train_judge.main(["--out", str(out / "judge"), "--text-file", str(text_file),
                      "--tokenizer-file", str(tok_file), "--n-layer", "2", "--n-embd", "48",
                      "--context", "32", "--steps", "80", "--batch-size", "16",
                      "--lr", "3e-3"])
    assert "STAND-IN" in (out / "judge" / "README.txt").read_text()
    return load_judge(str(out / "judge"), batch_size=32)


def test_mauve_separates_and_degenerate_text_has_lower_gen_ppl(trained_judge):
    g = torch.Generator().manual_seed(123)
    n = 100
    real = [grammar_doc(g) for _ in range(n)]
    real_2 = [grammar_doc(g) for _ in range(n)]
    degenerate = [REPEATED_DOC] * n
    ids = torch.zeros(n, 1, dtype=torch.long)
    settings = MauveSettings(kmeans_num_redo=1, kmeans_max_iter=50, seed=0)
    f_real = judge_features(trained_judge, ids, real)
    f_real_2 = judge_features(trained_judge, ids, real_2)
    f_degenerate = judge_features(trained_judge, ids, degenerate)
    mauve_real = mauve_from_features(f_real_2, f_real, settings)
    mauve_degenerate = mauve_from_features(f_degenerate, f_real, settings)
    assert mauve_real > 0.8
    assert mauve_degenerate < 0.5 * mauve_real
    ppl_real = generative_perplexity(*trained_judge.score(ids, real_2))
    ppl_degenerate = generative_perplexity(*trained_judge.score(ids, degenerate))
    # the failure MAUVE and entropy are there to catch: repetition fools perplexity
    assert ppl_degenerate < 0.5 * ppl_real


def test_judge_features_are_last_valid_token_hidden_state():
    tok = word_tokenizer()
    model = tiny_gpt2(tok, 32, seed=9)
    texts = ["a cat .", "the big old dog hears the bird ."]  # different lengths: padding
    feats = HFCausalLMJudge(model, tok, batch_size=2).features(
        torch.zeros(2, 1, dtype=torch.long), texts)
    for i, text in enumerate(texts):
        ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"],
               tok.eos_token_id]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        torch.testing.assert_close(feats[i], hidden.hidden_states[-1][0, -1], rtol=1e-5,
                                   atol=1e-5)


def test_judge_dtype_is_validated():
    with pytest.raises(ValueError, match="judge_dtype"):
        judges.load_judge("unused", dtype="float8")
