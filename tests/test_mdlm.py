"""algo=mdlm: the masked-diffusion math (flow/masked.py) against independent computations,
and the CLI end to end on the synthetic source."""

import itertools
import json
import math

import numpy as np
import torch

from flow import masked
from flow.path import stratified_times
from tests.test_main import run_main

V, L = 3, 3  # a tiny enumerable source over V**L sequences
MASK = V


def toy_source(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All V**L sequences (K, L) and a random law over them (K,), float64."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(len(seqs), generator=gen, dtype=torch.float64) ** 3  # uneven, all > 0
    return seqs, p / p.sum()


def exact_marginals(xt: torch.Tensor, seqs: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """p(x_0^l = v | the unmasked tokens of x_t) by enumeration: (B, L) -> (B, L, V) float64."""
    agree = ((seqs[None] == xt[:, None]) | (xt[:, None] == MASK)).all(-1)  # (B, K)
    post = agree.double() * p[None]
    post = post / post.sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(seqs, V).double()  # (K, L, V)
    return torch.einsum("bk,klv->blv", post, onehot)


def exact_logits(xt: torch.Tensor, seqs: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(B, L, V + 1) logits of the exact denoiser (mask column arbitrary: it is dropped)."""
    m = exact_marginals(xt, seqs, p)
    return torch.cat([m.clamp_min(1e-300).log(), torch.full_like(m[..., :1], 5.0)], -1)


def test_loss_matches_a_float64_direct_computation():
    gen = torch.Generator().manual_seed(3)
    b, length, vocab, eps = 4, 6, 5, 1e-3
    logits = torch.randn(b, length, vocab + 1, generator=gen)
    tokens = torch.randint(0, vocab, (b, length), generator=gen)
    t = torch.tensor([0.05, 0.3, 0.7, 1.0])
    xt = masked.mask_tokens(tokens, t, vocab, eps, gen)
    loss = masked.masked_diffusion_loss(logits, tokens, xt, t, vocab, eps)
    expected = torch.zeros(b, length, dtype=torch.float64)
    for i in range(b):
        alpha = lambda s: 1 - (1 - eps) * s  # noqa: E731
        ti = float(t[i])
        weight = (1 - eps) / (1 - alpha(ti))  # -alpha'(t) / (1 - alpha(t))
        for j in range(length):
            if xt[i, j] == vocab:
                row = logits[i, j, :vocab].double()
                log_p = row[tokens[i, j]] - math.log(float(row.exp().sum()))
                expected[i, j] = -weight * log_p
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    # the SUBS reference form gives the same per-token value (carry-over: 0 where unmasked)
    subs = masked.subs_log_probs(logits, xt, vocab).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(loss, -masked.loss_weight(t, eps)[:, None] * subs)
    assert bool(((xt == vocab) | (xt == tokens)).all())


def test_masking_rate_is_the_log_linear_schedule():
    gen = torch.Generator().manual_seed(0)
    n, eps = 200_000, 1e-3
    for t in (0.1, 0.5, 0.999):
        xt = masked.mask_tokens(torch.zeros(1, n, dtype=torch.long), torch.tensor([t]), 7,
                                eps, gen)
        rate = float((xt == 7).double().mean())
        q = (1 - eps) * t
        assert abs(rate - q) < 5 * math.sqrt(q * (1 - q) / n)


def _mask_sets():
    for k in range(1, L + 1):
        for positions in itertools.combinations(range(L), k):
            yield k, list(positions)


def _nelbo_terms(logits_fn, seqs):
    """Per sequence x (K,) and mask size k (1..L): sum over mask sets of size k of the loss
    at weight 1, i.e. sum_{l in M} -log p(x^l | x_t), through masked_diffusion_loss."""
    out = torch.zeros(len(seqs), L + 1, dtype=torch.float64)
    for k, positions in _mask_sets():
        xt = seqs.clone()
        xt[:, positions] = MASK
        one = torch.ones(len(seqs), dtype=torch.float64)
        loss = masked.masked_diffusion_loss(logits_fn(xt), seqs, xt, one, MASK, eps=0.0)
        out[:, k] += loss.sum(-1)
    return out


def test_exact_denoiser_nelbo_equals_the_nll_and_bounds_it_otherwise():
    """eps = 0, t ~ U(0, 1): E_t[(1/t) sum_{masked} -log p(x^l | x_t)] with P(mask set M) =
    t^k (1-t)^(L-k) integrates to sum_k B(k, L-k+1)·terms_k; with the exact denoiser this is
    -log p(x) for every x (any-order factorisation), else its mean over x ~ p is >= H(p)."""
    seqs, p = toy_source()
    beta = torch.tensor([0.0] + [math.gamma(k) * math.gamma(L - k + 1) / math.gamma(L + 1)
                                 for k in range(1, L + 1)], dtype=torch.float64)
    exact = _nelbo_terms(lambda xt: exact_logits(xt, seqs, p), seqs) @ beta
    torch.testing.assert_close(exact, -p.log(), rtol=1e-6, atol=1e-6)  # float32 CE
    gen = torch.Generator().manual_seed(1)
    noisy = _nelbo_terms(lambda xt: exact_logits(xt, seqs, p)
                         + 0.5 * torch.randn(*xt.shape, V + 1, generator=gen,
                                             dtype=torch.float64), seqs) @ beta
    entropy = float(-(p * p.log()).sum())
    assert float((p * noisy).sum()) > entropy + 1e-3


def test_monte_carlo_loss_matches_the_exact_expectation():
    """The training pipeline (antithetic t on [t_min, 1], mask_tokens, the loss) with the exact
    denoiser, eps = 1e-3: its mean agrees with the enumerated expectation within 4 stderr."""
    seqs, p = toy_source()
    eps, t_min, n = 1e-3, 1e-3, 60_000
    gen = torch.Generator().manual_seed(5)
    x0 = seqs[torch.multinomial(p, n, replacement=True, generator=gen)]
    offset = torch.rand(1, generator=gen, dtype=torch.float64)
    t = stratified_times(n, 0, 1, offset, t_min, 1.0)
    xt = masked.mask_tokens(x0, t, MASK, eps, gen)
    per_seq = masked.masked_diffusion_loss(exact_logits(xt, seqs, p), x0, xt, t, MASK,
                                           eps).double().sum(-1)
    # exact: E_x sum_M E_t[w(t) m^k (1-m)^(L-k)] c(x, M), t ~ U[t_min, 1], m = (1-eps) t
    nodes, weights = np.polynomial.legendre.leggauss(16)  # exact for these polynomials
    tt = torch.tensor(t_min + (1 - t_min) * (nodes + 1) / 2, dtype=torch.float64)
    ww = torch.tensor(weights / 2, dtype=torch.float64)  # the U[t_min, 1] density absorbed
    m = (1 - eps) * tt
    w = (1 - eps) / m
    per_k = torch.stack([(ww * w * m ** k * (1 - m) ** (L - k)).sum() if k else tt.new_zeros(())
                         for k in range(L + 1)])
    terms = _nelbo_terms(lambda z: exact_logits(z, seqs, p), seqs)
    expected = float(p @ (terms @ per_k))
    stderr = float(per_seq.std()) / math.sqrt(n)
    assert abs(float(per_seq.mean()) - expected) < 4 * stderr, (per_seq.mean(), expected, stderr)


def _sample(seqs, p, n, steps, seed):
    states = torch.tensor(list(itertools.product(range(V + 1), repeat=L)))  # every x_t
    table = exact_marginals(states, seqs, p)  # (V+1)^L rows: the denoiser as a lookup
    code = torch.tensor([(V + 1) ** (L - 1 - i) for i in range(L)])
    gen = torch.Generator().manual_seed(seed)
    out = masked.sample_ancestral(lambda xt, t: table[(xt * code).sum(-1)], n, L, MASK, steps,
                                  t_final=0.0, noise_removal=False, eps=1e-3, generator=gen)
    assert not bool((out == MASK).any())
    index = (out * torch.tensor([V ** (L - 1 - i) for i in range(L)])).sum(-1)
    return torch.bincount(index, minlength=V ** L).double() / n


def _tv_tolerance(q: torch.Tensor, n: int) -> float:
    """3 x the expected TV of an n-sample empirical law of q (normal approximation)."""
    return 3 * 0.5 * float((q * (1 - q) / n).sqrt().sum()) * math.sqrt(2 / math.pi)


def test_ancestral_sampler_with_the_exact_denoiser_reproduces_the_source():
    """Many steps: the law differs from p only when two positions unmask in the same step,
    probability <= C(L, 2) / steps (each position's unmask time is uniform on the grid)."""
    seqs, p = toy_source()
    n, steps = 20_000, 300
    q = _sample(seqs, p, n, steps, seed=2)
    tv = 0.5 * float((q - p).abs().sum())
    assert tv < _tv_tolerance(p, n) + math.comb(L, 2) / steps, tv


def test_one_step_draws_every_position_from_its_marginal():
    """steps = 1 to t = 0: all positions unmask at once, independently: the law is the product
    of p's marginals (not p itself)."""
    seqs, p = toy_source()
    marg = exact_marginals(torch.full((1, L), MASK), seqs, p)[0]  # (L, V)
    product = torch.ones(len(seqs), dtype=torch.float64)
    for i in range(L):
        product = product * marg[i, seqs[:, i]]
    n = 20_000
    q = _sample(seqs, p, n, 1, seed=3)
    assert 0.5 * float((q - product).abs().sum()) < _tv_tolerance(product, n)
    assert 0.5 * float((product - p).abs().sum()) > 3 * _tv_tolerance(product, n)


def test_masked_fraction_follows_the_schedule_along_the_sampler():
    """Stopped at t_final, a position is still masked with probability m(t_final) / m(1)."""
    eps, n = 1e-3, 4000
    gen = torch.Generator().manual_seed(4)
    uniform = lambda xt, t: torch.full((*xt.shape, V), 1.0 / V)  # noqa: E731
    for t_final in (0.25, 0.6):
        out = masked.sample_ancestral(uniform, n, L, MASK, 7, t_final=t_final,
                                      noise_removal=False, eps=eps, generator=gen)
        rate = float((out == MASK).double().mean())
        q = t_final  # m(t_final) / m(1) = (1 - eps) t_final / (1 - eps)
        assert abs(rate - q) < 5 * math.sqrt(q * (1 - q) / (n * L)), (rate, q)
        filled = masked.sample_ancestral(uniform, n, L, MASK, 7, t_final=t_final,
                                         noise_removal=True, eps=eps, generator=gen)
        assert not bool((filled == MASK).any())


TINY = ["data=synthetic", "data.valid_size=64", "model.length=8", "model.hidden_size=32",
        "model.n_heads=2", "model.n_blocks=1", "model.cond_dim=16",
        "loader.global_batch_size=8", "trainer.limit_val_batches=2",
        "trainer.val_check_interval=4", "lr_scheduler.num_warmup_steps=2",
        "trainer.enable_progress_bar=false", "sampling.steps=[4]", "sampling.print_samples=1"]


def test_cli_train_resume_sample_eval_with_the_oracle(tmp_path):
    run = tmp_path / "run"
    first = run_main(["algo=mdlm", *TINY, "trainer.max_steps=3", f"hydra.run.dir={run}"])
    assert first.returncode == 0, first.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and "ema" in ckpt
    assert ckpt["state_dict"]["backbone.input_embedding"].shape[0] == 64 + 1  # V + mask
    second = run_main(["algo=mdlm", *TINY, "trainer.max_steps=5", f"hydra.run.dir={run}"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr + second.stdout
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 5
    name = "blocks.0.qkv.weight"
    assert not torch.equal(resumed["ema"]["shadow"][name], ckpt["ema"]["shadow"][name])
    out = tmp_path / "eval"
    ev = run_main(["algo=mdlm", *TINY, "mode=sample_eval", f"eval.checkpoint_path={last}",
                   "eval.judge=oracle", "eval.compute_mauve=false", "eval.num_samples=8",
                   "sampling.batch_size=4", "sampling.steps=[1,4]", f"eval.output_dir={out}",
                   f"hydra.run.dir={tmp_path / 'evalrun'}"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [row["steps"] for row in summary["rows"]] == [1, 4]
    samples = json.loads((out / "samples.json").read_text())
    ids = torch.tensor([rec["token_ids"] for rec in samples["steps"]["4"]])
    assert ids.shape == (8, 8) and int(ids.max()) < 64  # no mask token left


PRESETS = [f"{data}_{name}{kind}" for data in ("owt", "lm1b") for name in ("mdlm", "ar")
           for kind in ("", "_gen_ppl")]


def test_baseline_presets_compose_and_their_scripts_select_them():
    from pathlib import Path

    from runtime.config import resolve_config
    from tests.helpers import compose_config
    root = Path(__file__).resolve().parents[1]
    for preset in PRESETS:
        config = resolve_config(compose_config([f"+experiment={preset}"]))
        data, name = preset.split("_")[:2]
        assert config.algo.name == name
        assert config.data.name == {"owt": "openwebtext", "lm1b": "lm1b"}[data]
        assert config.mode == ("sample_eval" if preset.endswith("gen_ppl") else "train")
        if name == "mdlm":
            assert config.training.t_min > 0  # the 1/t weight stays finite
        script = root / "scripts" / (f"gen_ppl_{data}_{name}.sh" if preset.endswith("gen_ppl")
                                     else f"train_{preset}.sh")
        assert f"+experiment={preset} " in script.read_text()


def test_module_draws_are_keyed_by_step_and_the_times_stratified():
    """Same (step, batch slot): the same loss; another step: other masks. The per-sequence
    times of one global batch are the stratified grid (offset + k/n) mod 1 on [t_min, 1]."""
    import algo
    import data
    from runtime.config import resolve_config
    from tests.helpers import compose_config
    config = resolve_config(compose_config(["algo=mdlm", *TINY]))
    tokenizer = data.get_tokenizer(config)
    module = algo.MDLM(config, len(tokenizer), tokenizer)
    assert module.backbone.input_embedding.shape[0] == len(tokenizer) + 1
    for p in module.backbone.parameters():
        torch.nn.init.normal_(p, std=0.1)
    tokens = torch.randint(0, len(tokenizer), (8, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    a, b = (module.compute_loss(batch, step=5, batch_idx=0) for _ in range(2))
    c = module.compute_loss(batch, step=6, batch_idx=0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    t = module.draw_times(8, step=5, batch_idx=0).double()
    u = (t - config.training.t_min) / (1 - config.training.t_min)
    gaps = torch.diff(torch.sort(u).values)
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 8), rtol=0, atol=1e-6)
