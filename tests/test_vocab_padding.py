"""The padded vocabulary inside the DiT (models/dit.py VOCAB_ALIGN) is speed only: every public
method takes and returns tensors over V, equal in float64 to the plain computation over V,
for an unaligned V (50, padded to 128) and an aligned one (128); the samplers give the same
tokens on the DiT as on a network written plainly over V."""

import pytest
import torch
import torch.nn.functional as F

from flow.sampling import (
    denoised_projection,
    initial_joint_state,
    initial_state,
    sample_euler,
    sample_flow_map,
)
from flow.schedule import AlphaGammaTable
from models.dit import PAD_LOGIT, VOCAB_ALIGN, DiT, pad_vocab_rows, padded_vocab
from speed import SpeedOptions

LENGTH = 12


def random_dit(vocab: int = 50, double_temb: bool = False, seed: int = 0,
               fused_ce: str = "none") -> DiT:
    torch.manual_seed(seed)
    net = DiT(vocab, LENGTH, hidden_size=32, n_blocks=2, n_heads=2, cond_dim=16, dropout=0.0,
              double_temb=double_temb, speed=SpeedOptions(fused_ce=fused_ce)).double().eval()
    with torch.no_grad():  # adaLN-zero and the zero output layer would hide the pads
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net


def plain_logits(net: DiT, hidden: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The output layer over V itself: its linear on the head features, no pads."""
    linear = net.output_layer.linear
    return F.linear(net.output_layer.features(hidden, c), linear.weight, linear.bias)


class Unpadded(torch.nn.Module):
    """The same network through the sampler interface, written plainly over V."""

    def __init__(self, net: DiT) -> None:
        super().__init__()
        self.net = net
        self.input_embedding = net.input_embedding

    def features(self, h, t, t2=None):
        return self.net.features(h, t, t2)

    def head(self, hidden, c):
        return plain_logits(self.net, hidden, c)

    def project(self, v):
        return v @ self.input_embedding.to(v.dtype)

    def denoised(self, hidden, c, project=True):
        logits = self.head(hidden, c)
        p = torch.softmax(logits, -1)
        return (self.project(p) if project else None), logits.argmax(-1)


def test_padded_sizes():
    assert padded_vocab(50) == VOCAB_ALIGN and padded_vocab(50258) == 50304
    assert padded_vocab(2 * VOCAB_ALIGN) == 2 * VOCAB_ALIGN
    x = torch.randn(2 * VOCAB_ALIGN, 3)
    assert pad_vocab_rows(x) is x  # aligned already: nothing copied
    padded = pad_vocab_rows(torch.randn(50, 3), PAD_LOGIT)
    assert padded.shape == (VOCAB_ALIGN, 3) and bool((padded[50:] == PAD_LOGIT).all())


@pytest.mark.parametrize("vocab", [50, 128])
def test_logits_project_and_denoised_are_the_plain_computation_over_v(vocab):
    net = random_dit(vocab)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(3, LENGTH, 32, generator=gen, dtype=torch.float64)
    t = torch.rand(3, generator=gen, dtype=torch.float64)
    hidden, c = net.features(h, t)
    plain = plain_logits(net, hidden, c)
    logits = net.logits(h, t)
    assert logits.shape == (3, LENGTH, vocab)
    torch.testing.assert_close(logits, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.head(hidden, c), plain, rtol=1e-12, atol=1e-12)
    v = torch.randn(3, LENGTH, vocab, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(net.project(v), v @ net.input_embedding, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="vocabulary"):
        net.project(torch.randn(2, vocab + 1, dtype=torch.float64))
    proj, tokens = net.denoised(hidden, c)
    torch.testing.assert_close(proj, torch.softmax(plain, -1) @ net.input_embedding,
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(tokens, plain.argmax(-1))
    none, same_tokens = net.denoised(hidden, c, project=False)
    assert none is None and torch.equal(same_tokens, tokens)


@pytest.mark.parametrize("vocab", [50, 128])
@pytest.mark.parametrize("fused_ce", ["chunked", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_is_the_float64_cross_entropy_over_v(vocab, fused_ce, weighted):
    """Per-token CE, or Σ w·CE with weights, and the output layer's gradients equal a float64
    cross-entropy of the plain logits over V, through either CE backend."""
    net = random_dit(vocab, fused_ce=fused_ce)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, vocab, (3, LENGTH), generator=gen)
    h = torch.randn(3, LENGTH, 32, generator=gen, dtype=torch.float64)
    t = torch.rand(3, generator=gen, dtype=torch.float64)
    w = torch.rand(3, LENGTH, generator=gen, dtype=torch.float64) if weighted else None
    out = net.cross_entropy(h, t, tokens, weights=w)
    loss = out if weighted else out.mean()
    params = [net.output_layer.linear.weight, net.output_layer.linear.bias]
    grads = torch.autograd.grad(loss, params)
    hidden, c = net.features(h, t)
    ce = F.cross_entropy(plain_logits(net, hidden, c).flatten(0, 1), tokens.flatten(),
                         reduction="none").view_as(tokens)
    ref = (ce * w).sum() if weighted else ce.mean()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(ref, params)):
        assert got.shape == want.shape  # the pads' gradient stays out of the parameters
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_samplers_give_the_same_tokens_as_a_plain_network():
    net, table = random_dit(), AlphaGammaTable(50)
    gen = torch.Generator().manual_seed(1)
    noise = initial_state(net, 6, LENGTH, gen, dtype=torch.float64)
    t = torch.full((6,), 0.4, dtype=torch.float64)
    padded = denoised_projection(net, noise, t, None, position_chunk=5)
    plain = denoised_projection(Unpadded(net), noise, t, None, position_chunk=5)
    torch.testing.assert_close(padded[0], plain[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(padded[1], plain[1])
    a = sample_euler(net, table, noise, 8, 1e-5, position_chunk=5)
    b = sample_euler(Unpadded(net), table, noise, 8, 1e-5, position_chunk=5)
    assert torch.equal(a, b)
    student = random_dit(double_temb=True, seed=1)
    joint = initial_joint_state([net, student], 6, LENGTH, gen, dtype=torch.float64)
    a = sample_flow_map(net, student, table, joint, 4, 1e-5, position_chunk=5)
    b = sample_flow_map(Unpadded(net), Unpadded(student), table, joint, 4, 1e-5,
                        position_chunk=5)
    assert torch.equal(a, b)
