"""The padded vocabulary of the V-sized products (models/dit.py VOCAB_ALIGN): speed only, so
every result must equal the unpadded computation, checked in float64 against a plain
computation over V and against the samplers run on a network that does not pad."""

import pytest
import torch
import torch.nn.functional as F

from flow.losses import fused_token_cross_entropy
from flow.sampling import (
    denoised_projection,
    initial_joint_state,
    initial_state,
    sample_euler,
    sample_flow_map,
)
from flow.schedule import AlphaGammaTable
from models.dit import PAD_LOGIT, VOCAB_ALIGN, DiT, pad_vocab_rows, padded_vocab

VOCAB, LENGTH = 50, 12  # 50 pads to 128


def random_dit(double_temb: bool = False, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    net = DiT(VOCAB, LENGTH, hidden_size=32, n_blocks=2, n_heads=2, cond_dim=16, dropout=0.0,
              double_temb=double_temb).double().eval()
    with torch.no_grad():  # adaLN-zero and the zero output layer would hide the pads
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net


class Unpadded(torch.nn.Module):
    """The same network seen through the plain sampler interface (no padded head)."""

    def __init__(self, net: DiT) -> None:
        super().__init__()
        self.net = net
        self.input_embedding = net.input_embedding

    def features(self, h, t, t2=None):
        return self.net.features(h, t, t2)

    def head(self, hidden, c):
        return self.net.output_layer.linear(self.net.head_features(hidden, c))  # over V


def test_padded_sizes():
    assert padded_vocab(VOCAB) == VOCAB_ALIGN and padded_vocab(50258) == 50304
    assert padded_vocab(2 * VOCAB_ALIGN) == 2 * VOCAB_ALIGN
    x = torch.randn(2 * VOCAB_ALIGN, 3)
    assert pad_vocab_rows(x) is x  # aligned already: nothing copied


def test_padded_head_is_the_plain_linear_plus_pads():
    net = random_dit()
    hidden, c = net.features(torch.randn(3, LENGTH, 32, dtype=torch.float64),
                             torch.rand(3, dtype=torch.float64))
    plain = F.linear(net.head_features(hidden, c), net.output_layer.linear.weight,
                     net.output_layer.linear.bias)
    padded = net.head(hidden, c, padded=True)
    assert padded.shape[-1] == padded_vocab(VOCAB)
    torch.testing.assert_close(net.head(hidden, c), plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded[..., :VOCAB], plain, rtol=1e-12, atol=1e-12)
    assert bool((padded[..., VOCAB:] == PAD_LOGIT).all())
    probs = torch.softmax(padded, dim=-1)
    assert bool((probs[..., VOCAB:] == 0).all())  # exactly: the pads carry no probability
    e = net.padded_embedding()
    assert bool((e[VOCAB:] == 0).all())
    torch.testing.assert_close(probs @ e, torch.softmax(plain, -1) @ net.input_embedding,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["chunked", "none"])
def test_fused_loss_over_padded_weights_is_the_cross_entropy_over_v(backend):
    """The loss the training step sees through forward(output=...) (padded weight and bias)
    and its gradients equal a float64 cross-entropy of the plain logits over V."""
    net = random_dit()
    tokens = torch.randint(0, VOCAB, (3, LENGTH))
    h = torch.randn(3, LENGTH, 32, dtype=torch.float64)
    t = torch.rand(3, dtype=torch.float64)
    loss = net(h, t, output=lambda x, w, b: fused_token_cross_entropy(
        backend, x, w, b, tokens)).mean()
    grads = torch.autograd.grad(loss, [net.output_layer.linear.weight,
                                       net.output_layer.linear.bias])
    hidden, c = net.features(h, t)
    feats = net.head_features(hidden, c)
    w, b = net.output_layer.linear.weight, net.output_layer.linear.bias
    ref = F.cross_entropy((feats @ w.T + b).flatten(0, 1), tokens.flatten())
    ref_grads = torch.autograd.grad(ref, [w, b])
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape  # the pads' gradient stays out of the parameters
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_samplers_give_the_same_tokens_padded_or_not():
    net, table = random_dit(), AlphaGammaTable(VOCAB)
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
    # stage 1: teacher and student padded together, or neither
    student = random_dit(double_temb=True, seed=1)
    joint = initial_joint_state([net, student], 6, LENGTH, gen, dtype=torch.float64)
    a = sample_flow_map(net, student, table, joint, 4, 1e-5, position_chunk=5)
    b = sample_flow_map(Unpadded(net), Unpadded(student), table, joint, 4, 1e-5,
                        position_chunk=5)
    assert torch.equal(a, b)
