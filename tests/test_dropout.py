"""models/dropout.py: dropout through bulk-drawn masks (flm::keep_mask).

Checked against what dropout is: each element kept with probability 1 - p (binomial bounds
on the count), kept values scaled by 1 / (1 - p) exactly, the backward through the forward's
own mask, eagerly and compiled (where a recomputed draw or two merged draws would show).
"""

from __future__ import annotations

import math

import pytest
import torch

from models import dropout as dropout_module
from models.dit import DiT
from models.dropout import DROPOUT_FORMS, Dropout, new_mask

SIGMAS = 5.0  # binomial bounds: a correct mask fails one check with probability ~6e-7


def binomial_bound(n: int, prob: float) -> float:
    return SIGMAS * math.sqrt(n * prob * (1.0 - prob))


def nonzero_input(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return torch.where(x == 0, torch.ones_like(x), x)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_count_is_binomial(p):
    n = 2**20
    kept = int(new_mask(torch.empty(n), p).sum())
    assert abs(kept - n * (1 - p)) < binomial_bound(n, 1 - p)


@pytest.mark.parametrize("form", DROPOUT_FORMS)
def test_kept_values_are_scaled_exactly(form):
    p, n = 0.1, 2**16
    x = nonzero_input(n, 0)
    y = Dropout(p, form).train()(x)
    kept = y != 0
    expected = (x.double() * kept / (1 - p)).float()  # float64, rounded once
    torch.testing.assert_close(y, expected, rtol=2**-23, atol=0)
    assert abs(int(kept.sum()) - n * (1 - p)) < binomial_bound(n, 1 - p)


DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="gpu", marks=pytest.mark.skipif(
               not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_round.sh cudatests)"))]


def masked_gradient_check(fn, p: float, n: int = 2**14, device: str = "cpu"):
    """fn(x) -> tuple of dropouts of x; each output's gradient goes through its own mask."""
    x = nonzero_input(n, 1).to(device).requires_grad_()
    outs = fn(x)
    weights = [torch.randn(n, generator=torch.Generator().manual_seed(10 + i)).to(device)
               for i in range(len(outs))]
    sum(((y * w).sum() for y, w in zip(outs, weights, strict=True))).backward()
    expected = sum((w * (y.detach() != 0) / (1 - p) for y, w in zip(outs, weights, strict=True)))
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-6)
    return outs


def test_gradient_goes_through_the_forward_mask_eagerly():
    drop = Dropout(0.3).train()
    masked_gradient_check(lambda x: (drop(x),), 0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_masks_are_distinct_and_saved_for_backward(device):
    """Two dropouts of one tensor in one compiled graph: two independent masks (a merged draw
    would make them equal: it did, before each draw got its own empty tensor), each gradient
    through its own forward mask (a mask recomputed in the backward would be a new draw)."""
    p = 0.5
    drop = Dropout(p).train()
    compiled = torch.compile(lambda x: (drop(x), drop(x)), fullgraph=True, backend="inductor")
    first, second = masked_gradient_check(compiled, p, device=device)
    n = first.numel()
    agree = int(((first != 0) == (second != 0)).sum())
    prob_agree = p * p + (1 - p) * (1 - p)  # independent masks
    assert abs(agree - n * prob_agree) < binomial_bound(n, prob_agree)


def test_seed_reproduces_the_mask():
    drop = Dropout(0.5).train()
    x = nonzero_input(4096, 2)
    torch.manual_seed(7)
    a = drop(x)
    torch.manual_seed(7)
    b = drop(x)
    c = drop(x)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_identity_cases_and_errors():
    x = nonzero_input(256, 3)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5)
    with pytest.raises(ValueError, match="dropout form"):
        Dropout(0.1, "philox")


def test_dit_blocks_use_the_module_form(monkeypatch):
    """The backbone's dropouts take models.dropout's form when built (the bench's switch)."""
    for form in DROPOUT_FORMS:
        monkeypatch.setattr(dropout_module, "DROPOUT_FORM", form)
        net = DiT(vocab_size=16, length=8, hidden_size=32, n_blocks=1, n_heads=2, cond_dim=8,
                  dropout=0.1, attn_softcap=None)
        assert {m.form for m in net.modules() if isinstance(m, Dropout)} == {form}
