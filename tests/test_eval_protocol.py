"""eval.protocol=paper | clean on hand-made samples, each rule checked against a direct count.

Samples exercise every row of the protocol table (evaluation/protocol.py): a leading EOS,
a mid-sample EOS followed by repeated text, an all-pad sample, samples longer than the
judge window, and LM1B-style ``[CLS] ... [SEP]`` text. The judge is a tiny random GPT-2
built from a config; the tokenizers are word-level ones built in memory (no network).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from evaluation import protocol as protocols
from evaluation.judges import HFCausalLMJudge, make_judge, window_starts
from evaluation.metrics import generative_perplexity
from evaluation.sample_eval import make_decode_fn, run_sample_eval, score_set, special_token_ids
from runtime.config import ConfigError
from tests.test_eval_judges import WORDS, tiny_gpt2

EOT = "<|endoftext|>"
MAX_LENGTH = 16  # model.length: the paper protocol truncates judge rows here
CONTEXT = 16  # the judge's n_positions


def word_level(specials: list[str], extra: list[str], split_punctuation: bool = False, **named):
    """A PreTrainedTokenizerFast over specials + extra + WORDS decoding with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + extra + WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    splitters = [pre_tokenizers.WhitespaceSplit()]
    if split_punctuation:  # "[CLS]" -> "[", "CLS", "]" as GPT-2 splits it into pieces
        splitters.append(pre_tokenizers.Punctuation())
    tok.pre_tokenizer = pre_tokenizers.Sequence(splitters)
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **named)


def owt_tokenizer():  # GPT-2-like data tokenizer: BOS = EOS = <|endoftext|>, [PAD] added
    return word_level([EOT, "[PAD]", "[UNK]"], [], bos_token=EOT, eos_token=EOT,
                      pad_token="[PAD]")


def lm1b_tokenizer():  # BERT-like data tokenizer: [CLS] first, [SEP] last, [PAD]
    return word_level(["[PAD]", "[CLS]", "[SEP]", "[UNK]"], [], bos_token="[CLS]",
                      eos_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                      sep_token="[SEP]")


def judge_tokenizer():  # GPT-2-like judge: <|endoftext|> is BOS, EOS and (paper) pad
    return word_level([EOT, "[UNK]"], ["[", "]", "CLS", "SEP", "PAD"], split_punctuation=True,
                      bos_token=EOT, eos_token=EOT, pad_token=EOT)


OWT_SAMPLES = [
    # leading EOS (document start), a mid-sample EOS, the same text repeated, two EOS
    [EOT, "the", "red", "cat", "sees", EOT, "the", "red", "cat", "sees", EOT, EOT],
    # no leading EOS: its first EOS is mid-sample; [PAD] text makes it longer than MAX_LENGTH
    ["a", "dog", ".", EOT, "a", "dog", ".", EOT, "[PAD]", "[PAD]", "[PAD]", "[PAD]"],
    ["[PAD]"] * 12,  # all pad: 36 judge tokens of literal "[PAD]" text
    ["the", "old", "king", "keeps", "a", "big", "stone", "and", "the", "ship", "leaves", "."],
]
LM1B_SAMPLES = [
    ["[CLS]", "the", "cat", "sees", "a", "dog", ".", "the", "dog", "sees", "a", "[SEP]"],
    ["[CLS]", "a", "bird", ".", "[SEP]", "[CLS]", "a", "bird", ".", "[SEP]", "[PAD]", "[PAD]"],
    ["[CLS]", "the", "river", "[SEP]", "[PAD]", "[PAD]", "[PAD]", "[PAD]", "[PAD]", "[PAD]",
     "[PAD]", "[PAD]"],
]


def ids_of(tokenizer, samples: list[list[str]]) -> torch.Tensor:
    vocab = tokenizer.get_vocab()
    return torch.tensor([[vocab[w] for w in s] for s in samples])


def expected_judge_ids(words: list[str], judge_tok) -> list[int]:
    """Judge ids of decoded words, by hand: EOT is the EOS id, [X] is "[", "X", "]"."""
    vocab = judge_tok.get_vocab()
    out: list[int] = []
    for w in words:
        if w == EOT:
            out.append(vocab[EOT])
        elif w.startswith("[") and w.endswith("]"):
            out += [vocab["["], vocab[w[1:-1]], vocab["]"]]
        else:
            out.append(vocab[w])
    return out


def direct_targets(row: list[int], eos: int) -> list[bool]:
    """The paper's counting rule, one token at a time."""
    counted, eos_seen = [], 0
    for t, token in enumerate(row):
        if token == eos:
            eos_seen += 1
        counted.append(t >= 1 and (token != eos or eos_seen == 1))
    return counted


def direct_nll(model, row: list[int], counted: list[bool], context: int) -> float:
    """float64, one forward per counted target on the tokens of its window before it."""
    model64 = model.double()
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(row)):
            if counted[t]:
                start = ((t - 1) // (context - 1)) * (context - 1)
                logits = model64(input_ids=torch.tensor([row[start:t]])).logits[0, -1]
                total -= torch.log_softmax(logits, -1)[row[t]].item()
    model.float()
    return total


def direct_entropy(tokens: list[int]) -> float:
    n = len(tokens)
    return -sum(c / n * math.log(c / n) for c in Counter(tokens).values())


@pytest.fixture(scope="module")
def judge_parts():
    tok = judge_tokenizer()
    return tok, tiny_gpt2(tok, CONTEXT, seed=11)


@pytest.mark.parametrize("dataset", ["owt", "lm1b"])
@pytest.mark.parametrize("call_size", [None, 1, 2])
def test_paper_protocol_matches_direct_count(judge_parts, dataset, call_size):
    judge_tok, model = judge_parts
    data_tok, samples = ((owt_tokenizer(), OWT_SAMPLES) if dataset == "owt"
                         else (lm1b_tokenizer(), LM1B_SAMPLES))
    ids = ids_of(data_tok, samples)
    texts = make_decode_fn(data_tok, keep_special_text=True)(ids)
    # decode: plain batch_decode, special tokens stay as text
    assert [t.split() for t in texts] == samples
    judge = HFCausalLMJudge(model, judge_tok, batch_size=3, protocol="paper",
                            max_length=MAX_LENGTH, call_size=call_size)
    nll_sum, n_tokens = judge.score(ids, texts)
    assert nll_sum.dtype == torch.float32
    eos = judge_tok.eos_token_id
    call = call_size or len(samples)
    total_nll, total_n = 0.0, 0
    for c in range(0, len(samples), call):
        # re-tokenise: truncated at model.length, no BOS/EOS, EOS-padded to the call's longest
        unpadded = [expected_judge_ids(s, judge_tok)[:MAX_LENGTH] for s in samples[c:c + call]]
        width = max(len(r) for r in unpadded)
        rows = [r + [eos] * (width - len(r)) for r in unpadded]
        got_ids, got_attn, got_mask = judge.paper_rows(texts[c:c + call])
        assert got_ids.tolist() == rows
        assert got_attn.sum(-1).tolist() == [len(r) for r in unpadded]
        for k, row in enumerate(rows):
            counted = direct_targets(row, eos)
            assert got_mask[k].tolist() == counted
            i = c + k
            assert int(n_tokens[i]) == sum(counted)
            expected = direct_nll(model, row, counted, CONTEXT)
            assert float(nll_sum[i]) == pytest.approx(expected, rel=1e-4)
            total_nll, total_n = total_nll + expected, total_n + sum(counted)
    assert generative_perplexity(nll_sum, n_tokens, dtype=torch.float32) == pytest.approx(
        math.exp(total_nll / total_n), rel=1e-4)


def test_paper_rules_on_the_owt_samples_by_name(judge_parts):
    """The named rows of the table, on the OWT samples, counted by hand."""
    judge_tok, model = judge_parts
    data_tok = owt_tokenizer()
    ids = ids_of(data_tok, OWT_SAMPLES)
    texts = make_decode_fn(data_tok, keep_special_text=True)(ids)
    judge = HFCausalLMJudge(model, judge_tok, batch_size=8, protocol="paper",
                            max_length=MAX_LENGTH)
    _, n_tokens = judge.score(ids, texts)
    # leading EOS is the first EOS: the mid-sample and final EOS do not count, the repeated
    # text after them does (4 + 4 words); padded from 12 to 16 with EOS, none counted
    assert int(n_tokens[0]) == 8
    # first EOS at position 3 counts; truncated at 16: 15 targets minus the second EOS
    assert int(n_tokens[1]) == 14
    # all pad: 36 tokens of "[PAD]" text, truncated at 16, no EOS: 15 targets
    assert int(n_tokens[2]) == MAX_LENGTH - 1
    # no EOS, 12 tokens, padded to 16: 11 word targets + its first pad
    assert int(n_tokens[3]) == 12


@pytest.mark.parametrize("dataset", ["owt", "lm1b"])
def test_clean_protocol_matches_direct_count(judge_parts, dataset):
    judge_tok, model = judge_parts
    data_tok, samples = ((owt_tokenizer(), OWT_SAMPLES) if dataset == "owt"
                         else (lm1b_tokenizer(), LM1B_SAMPLES))
    ids = ids_of(data_tok, samples)
    texts = make_decode_fn(data_tok, keep_special_text=False)(ids)
    specials = {EOT, "[PAD]", "[CLS]", "[SEP]"}
    words = [[w for w in s if w not in specials] for s in samples]
    assert [t.split() for t in texts] == words  # special tokens deleted, documents glued
    context = 8  # below the longest BOS + words + EOS (14): several windows
    small = tiny_gpt2(judge_tok, context, seed=12)
    judge = HFCausalLMJudge(small, judge_tok, batch_size=3, protocol="clean")
    nll_sum, n_tokens = judge.score(ids, texts)
    assert nll_sum.dtype == torch.float64
    eos = judge_tok.eos_token_id
    for i, w in enumerate(words):
        seq = [eos, *expected_judge_ids(w, judge_tok), eos]  # added BOS and EOS, no truncation
        assert len(window_starts(len(seq), context)) == math.ceil((len(seq) - 1) / (context - 1))
        counted = [t >= 1 for t in range(len(seq))]  # every position from 1
        assert int(n_tokens[i]) == len(seq) - 1
        assert float(nll_sum[i]) == pytest.approx(direct_nll(small, seq, counted, context),
                                                  rel=1e-4)


@pytest.mark.parametrize("name", ["paper", "clean"])
def test_entropy_rule_of_each_protocol(judge_parts, name):
    judge_tok, model = judge_parts
    data_tok = lm1b_tokenizer()
    ids = ids_of(data_tok, LM1B_SAMPLES)
    proto = protocols.get_protocol(name)
    texts = make_decode_fn(data_tok, proto.keep_special_text)(ids)
    judge = HFCausalLMJudge(model, judge_tok, batch_size=4, protocol=name,
                            max_length=MAX_LENGTH)
    specials = [] if proto.metrics_keep_special else special_token_ids(data_tok)
    row, records = score_set(judge, ids, texts, specials, proto.ppl_dtype)
    dropped = set(special_token_ids(data_tok))
    for record, sample in zip(records, ids.tolist()):
        kept = sample if name == "paper" else [t for t in sample if t not in dropped]
        assert record["entropy"] == pytest.approx(direct_entropy(kept), rel=1e-12)
    assert row["entropy_mean"] == pytest.approx(
        sum(r["entropy"] for r in records) / len(records))


def _config(**overrides):
    base = {"eval": {"protocol": "paper", "judge": "hf", "retokenize": True,
                     "compute_mauve": False, "reference_row": False},
            "sampling": {"state_dtype": "float32", "autocast": "auto"}}
    return OmegaConf.merge(base, overrides)


def test_sampler_settings_follow_the_protocol_and_log_overrides(caplog):
    assert protocols.sampler_settings(_config()) == ("float32", "bf16")
    assert protocols.sampler_settings(_config(eval={"protocol": "clean"})) == ("float32", "none")
    with caplog.at_level(logging.WARNING, logger="evaluation.protocol"):
        got = protocols.sampler_settings(_config(sampling={"state_dtype": "float64",
                                                           "autocast": "none"}))
    assert got == ("float64", "none")
    assert "sampling.autocast=none overrides the paper protocol's bf16" in caplog.text
    assert "sampling.state_dtype=float64 overrides the paper protocol's float32" in caplog.text


@pytest.mark.parametrize("overrides, key", [
    ({"eval": {"protocol": "mdlm"}}, "eval.protocol"),
    ({"sampling": {"autocast": "fp16"}}, "sampling.autocast"),
    ({"eval": {"retokenize": False}}, "eval.retokenize"),
    ({"eval": {"compute_mauve": True}}, "eval.compute_mauve"),
])
def test_bad_protocol_settings_give_one_config_error(overrides, key):
    with pytest.raises(ConfigError, match=key):
        protocols.validate(_config(**overrides))


def test_cpu_bf16_autocast_is_logged_not_silent(caplog):
    with caplog.at_level(logging.WARNING, logger="evaluation.protocol"):
        with protocols.autocast_context("bf16", torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
    assert "applies on CUDA only" in caplog.text


def test_make_judge_paper_pads_with_eos_and_summary_records_protocol(tmp_path, judge_parts):
    judge_tok, model = judge_parts
    saved = judge_tokenizer()
    saved.pad_token = "[UNK]"  # a judge saved with another pad: the paper protocol resets it
    model.save_pretrained(tmp_path / "judge")
    saved.save_pretrained(tmp_path / "judge")
    cfg = OmegaConf.create({"judge": "hf", "gen_ppl_eval_model_name_or_path": str(
        tmp_path / "judge"), "judge_dtype": "float32", "perplexity_batch_size": 2,
        "retokenize": True, "protocol": "paper"})
    judge = make_judge(cfg, max_length=MAX_LENGTH, call_size=2)
    assert judge.tokenizer.pad_token_id == judge.tokenizer.eos_token_id
    assert (judge.protocol, judge.max_length, judge.call_size) == ("paper", MAX_LENGTH, 2)
    data_tok = owt_tokenizer()
    ids = ids_of(data_tok, OWT_SAMPLES)
    decode = make_decode_fn(data_tok, keep_special_text=True)
    summary = run_sample_eval(
        lambda steps, n, seed: ids[:n], decode, judge, reference_texts=None,
        reference_ids=None, steps_list=[1], num_samples=len(OWT_SAMPLES), seed=0,
        out_dir=str(tmp_path / "out"), model_name="fake", network_calls_per_step=1,
        compute_mauve=False, warmup=False, protocol="paper",
        sampler={"state_dtype": "float32", "autocast": "bf16"})
    with open(tmp_path / "out" / "summary.json") as f:
        on_disk = json.load(f)
    assert on_disk["protocol"] == "paper" and on_disk["sampler"]["autocast"] == "bf16"
    assert summary["table"].splitlines()[0] == "gen-PPL protocol: paper"
    assert on_disk["reference"] is None and "reference" not in summary["table"]
    nll, n = judge.score(ids, decode(ids))
    assert on_disk["rows"][0]["gen_ppl"] == pytest.approx(
        math.exp(float(nll.double().sum()) / int(n.sum())), rel=1e-5)


def test_main_sample_eval_paper_protocol_end_to_end(tmp_path):
    """train a tiny FLM, then `main mode=sample_eval eval.protocol=paper`: the protocol and
    sampler settings are recorded, and each sample's target count is the direct count of its
    text re-tokenised by the judge (truncated at model.length, EOS-padded per sampling batch)."""
    from tests.test_main import TINY, run_main, tiny_judge

    run = tmp_path / "run"
    trained = run_main(TINY + ["trainer.max_steps=2", "sampling.print_samples=0",
                               f"hydra.run.dir={run}"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    judge_dir = tiny_judge(tmp_path / "judge")
    out = tmp_path / "eval"
    batch = 2
    ev = run_main(TINY + ["mode=sample_eval", "eval.protocol=paper",
                          f"eval.checkpoint_path={run / 'checkpoints' / 'last.ckpt'}",
                          f"eval.gen_ppl_eval_model_name_or_path={judge_dir}",
                          "sampling.steps=[2]", "eval.num_samples=4", f"sampling.batch_size={batch}",
                          "eval.compute_mauve=false", "eval.reference_row=false",
                          f"eval.output_dir={out}", f"hydra.run.dir={tmp_path / 'evalrun'}"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "applies on CUDA only" in ev.stderr + ev.stdout  # auto -> bf16, logged on CPU
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "paper" and summary["reference"] is None
    assert summary["sampler"] == {"state_dtype": "float32", "autocast": "bf16"}
    records = json.loads((out / "samples.json").read_text())["steps"]["2"]
    from transformers import AutoTokenizer

    judge_tok = AutoTokenizer.from_pretrained(judge_dir)
    eos = judge_tok.eos_token_id
    length = 32  # model.length in TINY
    for c in range(0, len(records), batch):
        rows = [judge_tok(r["text"], add_special_tokens=False)["input_ids"][:length]
                for r in records[c:c + batch]]
        width = max(len(r) for r in rows)
        for r, row in zip(records[c:c + batch], rows):
            assert r["judge_n_tokens"] == sum(direct_targets(row + [eos] * (width - len(row)),
                                                             eos))
    pooled = math.exp(sum(r["judge_nll_sum"] for r in records)
                      / sum(r["judge_n_tokens"] for r in records))
    assert summary["rows"][0]["gen_ppl"] == pytest.approx(pooled, rel=1e-5)


def test_projection_onto_e_stays_float32_under_bf16_autocast():
    """sampling.autocast=bf16 autocasts the backbone only: softmax(logits) @ E keeps float32
    (the paper's state update is float32). CPU autocast stands in for CUDA's; V = 50 is
    unaligned, so the DiT's padded product is what runs."""
    from flow.sampling import denoised_projection
    from models.dit import DiT

    torch.manual_seed(0)
    vocab, dim, length = 50, 16, 5
    net = DiT(vocab_size=vocab, length=length, hidden_size=dim, n_blocks=1, n_heads=2,
              cond_dim=8, dropout=0.0)
    with torch.no_grad():  # past adaLN-zero's zero init: logits that differ per position
        for param in net.parameters():
            param.add_(0.5 * torch.randn_like(param))
    h = torch.randn(2, length, dim)
    t = torch.full((2,), 0.5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        proj, tokens = denoised_projection(net, h, t, None)  # one chunk: all positions
        logits = net.head(*net.features(h, t))
        bf16_product = torch.softmax(logits, -1) @ net.input_embedding.detach()
    expected = (torch.softmax(logits.double(), -1) @ net.input_embedding.detach().double())
    assert logits.dtype == torch.bfloat16
    assert proj.dtype == torch.float32 and bf16_product.dtype == torch.bfloat16
    assert torch.allclose(proj.double(), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(bf16_product.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(tokens, logits.argmax(-1))
