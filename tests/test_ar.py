"""algo=ar: causal attention, the next-token loss and the sampler against independent
computations, and the CLI end to end on the synthetic source."""

import itertools
import json
import math

import pytest
import torch

from flow.autoregressive import next_token_nll, sample_autoregressive, shift_for_next_token
from models.dit import DiT
from runtime.config import resolve_config
from tests.helpers import compose_config
from tests.test_main import run_main
from tests.test_mdlm import TINY


def tiny_dit(causal: bool) -> DiT:
    torch.manual_seed(0)
    net = DiT(vocab_size=11, length=12, hidden_size=32, n_blocks=2, n_heads=2, cond_dim=16,
              dropout=0.0, causal=causal).double()
    for p in net.parameters():  # adaLN-zero and the zeroed output layer would hide everything
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


@pytest.mark.parametrize("causal", [True, False])
def test_a_later_token_does_not_change_earlier_logits_under_causal_attention(causal):
    net = tiny_dit(causal)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 11, (3, 12), generator=gen)
    t = torch.zeros(3, dtype=torch.float64)
    k = 7
    y = x.clone()
    y[:, k] = (x[:, k] + 1) % 11
    a = net(net.embed_tokens(x), t)
    b = net(net.embed_tokens(y), t)
    earlier = (a[:, :k] - b[:, :k]).abs().max()
    later = (a[:, k:] - b[:, k:]).abs().max()
    assert later > 1e-6  # the changed token does reach its own and later positions
    if causal:
        assert earlier == 0
    else:
        assert earlier > 1e-6  # bidirectional attention: the check above can fail


@pytest.mark.parametrize("mode", ["bos", "start"])
def test_loss_matches_a_per_token_float64_computation(mode):
    gen = torch.Generator().manual_seed(2)
    b, length, vocab = 3, 6, 5
    tokens = torch.randint(0, vocab, (b, length), generator=gen)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, 4:] = 0
    inputs, targets, tmask = shift_for_next_token(tokens, mask, mode, start_index=vocab)
    width = vocab + (mode == "start")
    logits = torch.randn(b, inputs.shape[1], width, generator=gen)
    nll = next_token_nll(logits, targets, vocab)
    total, count = 0.0, 0
    for i in range(b):
        first = 1 if mode == "bos" else 0
        for j in range(first, length):  # predict tokens[i, j] from tokens[i, :j]
            if not mask[i, j]:
                continue
            pos = j - first  # the position whose output predicts token j
            if mode == "start":
                prev = vocab if j == 0 else int(tokens[i, j - 1])
            else:
                prev = int(tokens[i, j - 1])
            assert int(inputs[i, pos]) == prev
            row = logits[i, pos, :vocab].double()
            value = -(row[tokens[i, j]] - math.log(float(row.exp().sum())))
            assert abs(float(nll[i, pos]) - value) < 1e-5
            total, count = total + value, count + 1
    assert int(tmask.sum()) == count
    mean = float((nll.double() * tmask).sum() / tmask.sum())
    assert abs(mean - total / count) < 1e-5


def test_sampler_with_exact_conditionals_reproduces_the_source():
    """Toy source over V**L sequences; next_logits gives log p(x_k | x_<k) exactly (start
    entry V first). TV of n samples vs p within 3 x its expected value."""
    v, length, n = 3, 3, 20_000
    seqs = torch.tensor(list(itertools.product(range(v), repeat=length)))
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(len(seqs), generator=gen, dtype=torch.float64) ** 3
    p = p / p.sum()

    def next_logits(x: torch.Tensor) -> torch.Tensor:
        prefix = x[:, 1:]  # drop the start entry
        k = prefix.shape[1]
        agree = (seqs[None, :, :k] == prefix[:, None]).all(-1).double() * p[None]  # (B, K)
        nxt = torch.nn.functional.one_hot(seqs[:, k], v).double()  # (K, v)
        probs = agree @ nxt
        logits = (probs / probs.sum(-1, keepdim=True)).log()
        return torch.cat([logits, torch.full_like(logits[:, :1], 9.0)], -1)  # start: excluded

    prefix = torch.full((n, 1), v, dtype=torch.long)
    out = sample_autoregressive(next_logits, prefix, length, v, gen)[:, 1:]
    assert out.shape == (n, length) and int(out.max()) < v
    index = (out * torch.tensor([v ** (length - 1 - i) for i in range(length)])).sum(-1)
    q = torch.bincount(index, minlength=len(seqs)).double() / n
    tv = 0.5 * float((q - p).abs().sum())
    tol = 3 * 0.5 * float((p * (1 - p) / n).sqrt().sum()) * math.sqrt(2 / math.pi)
    assert tv < tol, (tv, tol)


def test_first_token_bos_needs_a_bos_token():
    import algo
    import data
    from runtime.config import ConfigError
    config = resolve_config(compose_config(["algo=ar", *TINY]))
    tokenizer = data.get_tokenizer(config)  # synthetic: no BOS
    with pytest.raises(ConfigError, match="algo.first_token=start"):
        algo.AR(config, len(tokenizer), tokenizer)
    with pytest.raises(ConfigError, match="algo.double_temb"):
        algo.AR(resolve_config(compose_config(["algo=ar", *TINY, "algo.double_temb=true",
                                               "algo.first_token=start"])),
                len(tokenizer), tokenizer)


def test_cli_train_and_sample_eval_with_the_oracle(tmp_path):
    run = tmp_path / "run"
    length = 8
    args = ["algo=ar", "algo.first_token=start", *TINY]
    first = run_main([*args, "trainer.max_steps=3", f"hydra.run.dir={run}"])
    assert first.returncode == 0, first.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and "ema" in ckpt
    assert ckpt["hyper_parameters"]["config"]["algo"]["name"] == "ar"
    out = tmp_path / "eval"
    ev = run_main([*args, "mode=sample_eval", f"eval.checkpoint_path={last}",
                   "eval.judge=oracle", "eval.compute_mauve=false", "eval.num_samples=8",
                   "sampling.batch_size=4", f"sampling.steps=[{length}]",
                   f"eval.output_dir={out}", f"hydra.run.dir={tmp_path / 'evalrun'}"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][0]["network_calls_per_sample"] == length
    samples = json.loads((out / "samples.json").read_text())
    ids = torch.tensor([rec["token_ids"] for rec in samples["steps"][str(length)]])
    assert ids.shape == (8, length) and int(ids.max()) < 64  # no start entry emitted


def test_training_loss_is_the_sampler_models_log_likelihood():
    """The teacher-forced loss of the module equals the mean of -log p(x_j | x_<j) with each
    conditional computed like generate does (the prefix alone through the network), in
    float64: the causal mask makes training and sampling one model."""
    import algo
    import data
    config = resolve_config(compose_config(["algo=ar", "algo.first_token=start", *TINY]))
    tokenizer = data.get_tokenizer(config)
    module = algo.AR(config, len(tokenizer), tokenizer).double().eval()
    for p in module.backbone.parameters():
        torch.nn.init.normal_(p, std=0.1)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, len(tokenizer), (2, 8), generator=gen)
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    loss = module.compute_loss(batch, step=0, batch_idx=0)
    net, total = module.backbone, []
    for j in range(tokens.shape[1]):
        prefix = torch.cat([torch.full((2, 1), module.start_index), tokens[:, :j]], dim=1)
        hidden, c = net.features(net.embed_tokens(prefix), torch.zeros(2, dtype=torch.float64))
        logits = net.head(hidden[:, -1:], c)[:, 0, :len(tokenizer)]
        total.append(-logits.log_softmax(-1).gather(-1, tokens[:, j:j + 1])[:, 0])
    torch.testing.assert_close(loss.double(), torch.stack(total).mean(), rtol=1e-5, atol=1e-6)
