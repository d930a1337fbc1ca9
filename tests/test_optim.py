"""Clipping by the global norm through the fused AdamW's grad_scale equals torch's
clip_grad_norm_ followed by AdamW; a training run reads its gradients' norms once per step
(the guard's, reused by the clipping) and logs the norm it clipped by."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from runtime import optim, reliability
from runtime.config import resolve_config
from runtime.monitoring import LoggedLater
from tests.helpers import RecordingLogger, compose_config
from tests.test_reliability import VOCAB, FaultyFLM, RandomTokens


def _params(seed: int, device: str = "cpu") -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(device))
            for s in shapes]


def _set_grads(params, step: int, size: float) -> None:
    """Gradients of norm ~``size`` x (1 + 3·step): a factor that changes from step to step (Adam
    is invariant to one constant factor, so a wrong clip would still pass with a constant one)."""
    gen = torch.Generator().manual_seed(100 + step)
    for p in params[:-1]:  # the last parameter has no gradient: left out of norm and update
        p.grad = (size * (1 + 3 * step) * torch.randn(p.shape, generator=gen, dtype=p.dtype)
                  ).to(p.device)
    params[-1].grad = None


def _kernel_clipping_against_clip_grad_norm(size: float, device: str) -> None:
    """Three steps, float64: the fused AdamW (on ``device``) with the clipping factor as its
    grad_scale against torch's clip_grad_norm_ and the plain (for-loop) AdamW on the CPU. The
    gradients are not touched by the clipping itself (no pass over them)."""
    ours, reference = _params(0, device), _params(0)
    fused = torch.optim.AdamW(ours, lr=0.1, weight_decay=0.1, fused=True)
    plain = torch.optim.AdamW(reference, lr=0.1, weight_decay=0.1, foreach=False)
    for step in range(3):
        _set_grads(ours, step, size)
        _set_grads(reference, step, size)
        before = [p.grad.clone() for p in ours[:-1]]
        total, grad_scale = optim.clip_by_global_norm(fused, 1.0)
        optim.StepHealth(grad_scale=grad_scale).hand_to(fused)
        expected = torch.nn.utils.clip_grad_norm_(reference, 1.0)
        torch.testing.assert_close(total.double().cpu(), expected, rtol=1e-6,
                                   atol=0)  # float32 norms
        assert all(torch.equal(p.grad, b) for p, b in zip(ours[:-1], before))
        assert float(fused.grad_scale) == pytest.approx(max(1.0, (float(expected) + 1e-6)),
                                                        rel=1e-6)
        fused.step()
        plain.step()
        # grad_scale is float32 (the norms are): each step's gradient is off by up to 2^-24
        # relative, so m / sqrt(v) by ~2 x that, the update (lr 0.1) by ~1.2e-8 a step
        for a, b in zip(ours, reference):
            torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-7)
    assert ours[-1].grad is None and ours[-1] not in fused.state  # no gradient, no update


@pytest.mark.parametrize("size", [10.0, 0.01])  # the global norm far over / under max_norm
def test_kernel_clipping_equals_clip_grad_norm_then_adamw(size):
    _kernel_clipping_against_clip_grad_norm(size, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("size", [10.0, 0.01])
def test_kernel_clipping_on_the_gpu_equals_clip_grad_norm_then_adamw(size):
    """The CUDA kernel divides by grad_scale as the CPU one does (what GradScaler relies on)."""
    _kernel_clipping_against_clip_grad_norm(size, "cuda")


def test_given_norms_are_the_ones_clipped_by():
    """Per-tensor norms handed in (the guard's) are used, not read again."""
    params = _params(1)
    _set_grads(params, 0, 10.0)
    optimizer = torch.optim.AdamW(params, fused=True)
    true = optim.gradient_norms([p.grad for p in params[:-1]])
    total, grad_scale = optim.clip_by_global_norm(optimizer, 1.0, norms=2 * true)
    expected = 2 * torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params[:-1]]))
    torch.testing.assert_close(total.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_scale.double(), expected + 1e-6, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"norms of shape \(3,\) for 2 gradients"):
        optim.clip_by_global_norm(optimizer, 1.0, norms=torch.ones(3))
    with pytest.raises(ValueError, match="max_norm=0.0: must be > 0"):
        optim.clip_by_global_norm(optimizer, 0.0)


@pytest.mark.parametrize("case", ["foreach AdamW", "loss scaler"])
def test_without_the_fused_kernel_the_gradients_are_scaled_in_place(case):
    """A foreach AdamW, or a fused one under a loss scaler (which owns grad_scale): the gradients
    are multiplied as clip_grad_norm_ multiplies them, and a factor left on the optimizer by an
    earlier step is dropped."""
    params, reference = _params(2), _params(2)
    _set_grads(params, 0, 10.0)
    _set_grads(reference, 0, 10.0)
    optimizer = torch.optim.AdamW(params, fused=case == "loss scaler")
    optimizer.grad_scale = torch.tensor(5.0)  # stale
    _, grad_scale = optim.clip_by_global_norm(
        optimizer, 1.0, scaler=object() if case == "loss scaler" else None)
    optim.StepHealth(grad_scale=grad_scale).hand_to(optimizer)
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    assert grad_scale is None and not hasattr(optimizer, "grad_scale")
    for a, b in zip(params[:-1], reference[:-1]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    assert optim.clip_by_global_norm(torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))]),
                                     1.0) == (None, None)  # no gradients: nothing to clip


class GlobalNorms(pl.Callback):
    """The float64 global gradient norm at every optimizer step, before clipping (runs after
    the guard, before Lightning clips)."""

    def __init__(self):
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = optim.gradients(optimizer)
        self.norms.append(float(torch.linalg.vector_norm(
            torch.stack([g.double().norm() for g in grads]))))


def _fit(tmp_path, fused: str, clip: float, max_steps: int = 4):
    config = resolve_config(compose_config(
        ["model.length=8", "model.hidden_size=16", "model.n_heads=2", "model.n_blocks=1",
         "model.cond_dim=16", "loader.global_batch_size=4", "lr_scheduler.num_warmup_steps=0",
         "optim.lr=1e-2", f"optim.fused={fused}"], run_dir=str(tmp_path)))
    pl.seed_everything(0)
    module = FaultyFLM(config, vocab_size=VOCAB)
    norms, logger = GlobalNorms(), RecordingLogger()
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger,
                         log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=clip,
                         callbacks=[reliability.NonFiniteGuard(3, tmp_path / "last.ckpt"), norms,
                                    LoggedLater(("train/loss", "train/grad_norm"))])
    trainer.fit(module, DataLoader(RandomTokens(64), batch_size=4))
    return module, norms.norms, logger.values("train/grad_norm")


def test_a_run_reads_its_gradient_norms_once_a_step_and_logs_the_norm(tmp_path, monkeypatch):
    """Guard and clipping share one multi-tensor norm read per step; train/grad_norm is the
    global norm before clipping; the fused run (grad_scale) ends where the foreach run (in-place
    multiply) does, with clipping active at every step (max_norm far under the norms)."""
    calls = []
    foreach_norm = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda *a, **k: calls.append(1) or
                        foreach_norm(*a, **k))
    fused, norms, logged = _fit(tmp_path / "fused", "true", clip=1e-3)
    assert len(calls) == 4 == len(norms)
    assert [s for s, _ in logged] == [0, 1, 2, 3]
    assert min(norms) > 1e-2  # clipped at every step
    torch.testing.assert_close(torch.tensor([v for _, v in logged], dtype=torch.float64),
                               torch.tensor(norms, dtype=torch.float64), rtol=1e-5, atol=0)
    plain, plain_norms, _ = _fit(tmp_path / "plain", "false", clip=1e-3)
    torch.testing.assert_close(torch.tensor(plain_norms), torch.tensor(norms), rtol=1e-4, atol=0)
    for (name, a), b in zip(fused.backbone.state_dict().items(),
                            plain.backbone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_without_clipping_no_norm_is_logged(tmp_path):
    _, norms, logged = _fit(tmp_path, "true", clip=0.0, max_steps=2)
    assert len(norms) == 2 and logged == []
