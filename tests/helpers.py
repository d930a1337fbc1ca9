"""Shared test fixtures: tiny configs and an exact denoiser on a finite source."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from flow.schedule import AlphaGammaTable

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
# the tiny DiT of the end-to-end tests (a run of main takes seconds on a CPU)
TINY_MODEL = ["model.length=32", "model.hidden_size=32", "model.n_heads=2", "model.n_blocks=1",
              "model.cond_dim=16"]


def compose_config(overrides: list[str] | None = None, run_dir: str = "/tmp/flm-test-run",
                   ) -> DictConfig:
    """The project's config as Hydra composes it, with the run directory pinned
    (outside a Hydra run, ``${hydra:runtime.output_dir}`` does not resolve)."""
    pinned = [f"checkpointing.save_dir={run_dir}", f"eval.output_dir={run_dir}/eval"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config", overrides=pinned + (overrides or []))


class ExactDenoiser(torch.nn.Module):
    """E[e(x_l) | x_gamma = z] for a finite source over sequences, as logits.

    The posterior over the support is ``pi(x)·N(z; gamma·e(x), (1 - gamma)^2 I)``;
    the per-position marginal of it is the exact x1-prediction. With an identity
    ``input_embedding`` the D-space sampler runs on z itself.
    """

    def __init__(self, probs: torch.Tensor, vocab: int, length: int) -> None:
        super().__init__()
        support = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
        self.register_buffer("support", support)  # (S, L)
        self.register_buffer("log_prior", probs.double().clamp_min(1e-300).log())
        self.register_buffer("input_embedding", torch.eye(vocab, dtype=torch.float64))
        self.table = AlphaGammaTable(vocab)
        self.vocab = vocab

    def logits(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z = z.double()
        gamma = self.table.gamma_of_alpha(t.double())[:, None, None]  # (B, 1, 1)
        onehot = torch.nn.functional.one_hot(self.support, self.vocab).double()  # (S, L, V)
        # -||z - gamma e(x)||^2 / (2 (1-gamma)^2), dropping terms constant in x
        cross = torch.einsum("blv,slv->bs", z, onehot)
        log_post = self.log_prior[None] + (gamma[:, :, 0] * cross - 0.5 * gamma[:, :, 0] ** 2
                                           * onehot.sum((1, 2))[None]) / (1 - gamma[:, :, 0]) ** 2
        post = torch.softmax(log_post, dim=-1)  # (B, S)
        marg = torch.einsum("bs,slv->blv", post, onehot)
        return marg.clamp_min(1e-300).log()

    # network interface used by flow.sampling (identity embedding: h = z)
    def features(self, h, t, t2=None):
        return h, t

    def head(self, hidden, t):
        return self.logits(hidden, t)

    def project(self, v):
        return v  # v @ I

    def denoised(self, hidden, t, project=True):
        logits = self.head(hidden, t)
        return (torch.softmax(logits, -1) if project else None), logits.argmax(-1)


def total_variation(samples: torch.Tensor, probs: torch.Tensor, vocab: int) -> float:
    length = samples.shape[1]
    index = (samples * (vocab ** torch.arange(length - 1, -1, -1))).sum(1)
    counts = torch.bincount(index, minlength=vocab ** length).double()
    return 0.5 * float((counts / counts.sum() - probs.double()).abs().sum())


class RecordingLogger:
    """A Lightning logger that keeps every ``log_metrics`` call as (step, metrics)."""

    def __new__(cls):
        from pytorch_lightning.loggers.logger import Logger

        class Recording(Logger):
            def __init__(self):
                super().__init__()
                self.rows: list[tuple[int, dict]] = []

            name, version = "recording", 0

            def log_hyperparams(self, params, *args, **kwargs):
                pass

            def log_metrics(self, metrics, step=None):
                self.rows.append((step, dict(metrics)))

            def values(self, key: str) -> list[tuple[int, float]]:
                """(step, value) of every row holding ``key``, in writing order."""
                return [(s, float(m[key])) for s, m in self.rows if key in m]

        return Recording()


def bf16_attention_case(seed: int = 0):
    """CUDA attention inputs (B, H, L, hd) = (2, 4, 512, 64), logits reaching the cap:
    (bf16 leaves, float64 leaves with the same rounded values, bf16 output gradient)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    b, h, length, hd = 2, 4, 512, 64
    q, k, v = (torch.randn(b, h, length, hd, device="cuda", generator=gen) * 4 for _ in range(3))
    grad = torch.randn(b, h, length, hd, device="cuda", generator=gen).bfloat16()
    ins = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    return ins, [x.detach().double().requires_grad_() for x in ins], grad


def assert_matches_float64_attention(out, ins, ref_in, grad, softcap: float, causal: bool):
    """``out`` (its backward already run with ``grad``) and the gradients of ``ins`` against
    speed.attention.math_attention in float64 on ``ref_in``: a few units of bf16's 2^-8 relative
    rounding of the largest."""
    from speed.attention import math_attention  # torch._inductor-free: imported on use

    ref = math_attention(*ref_in, softcap, causal)
    ref.backward(grad.double())
    for mine, theirs in [(out, ref)] + [(x.grad, y.grad) for x, y in zip(ins, ref_in)]:
        err = (mine.double() - theirs).abs().max() / theirs.abs().max()
        assert err < 2e-2, err
