"""Diffusion Transformer over continuous token states.

The backbone knows nothing about flows. It maps a D-dimensional input state
``h`` (B, L, D) and one or two times to logits over the vocabulary
(B, L, V). How ``h`` is made from a continuous one-hot-space state ``z``
(B, L, V) is exposed as three linear maps of the input embedding ``E``
(V, D): ``embed_state(z) = z @ E``, ``embed_tokens(x) = E[x]`` and
``input_embedding`` itself for the D-space path (docs/math.md §3).

Blocks: pre-LayerNorm attention + MLP, adaLN-zero modulation from the time
conditioning, rotary positions, soft-capped attention (bidirectional, or causal
with ``causal=True``), untied input/output embeddings.

The conventions are the paper's code (``david3684/flm`` models/dit.py), so its
released weights load by renaming keys only (models/load.py): raw t in [0, 1] to
the sinusoidal time features, the two time embeddings summed before the SiLU,
half-split rotary pairs (j, j + hd/2), attention logits capped at 50·tanh(·/50),
adaLN chunks (shift, scale, gate) x (attention, MLP), output adaLN (shift, scale),
qkv rows [q | k | v] each head-major, and a kaiming-uniform input embedding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from flow.flow_map import softmax_wide
from speed.attention import attention, prepare_softcap
from speed.cross_entropy import linear_cross_entropy
from speed.options import SpeedOptions

TIME_FREQUENCY_DIM = 256  # sinusoidal features fed to the time MLP
# Inside the network, the vocabulary side of every V-sized product is padded to a multiple of
# VOCAB_ALIGN rows: cuBLAS's fast kernels need 16-byte-aligned leading dimensions, and
# V = 50,258 (GPT-2 + 1) has none; padded, the output layer's products ran 2.6x and p @ E 2.8x
# faster on an H200 (bench/vocab_align.py, bench/results/vocab_align_h200.txt). Pad rows of
# the output weight and of E are zero and pad logits are PAD_LOGIT, so a softmax over the
# padded logits puts exactly 0 on the pads (exp(PAD_LOGIT - max) underflows to 0 in any float
# dtype unless every real logit is below -29,000). Every public method takes and returns
# tensors over V itself: the padding is invisible outside this file.
VOCAB_ALIGN = 128
PAD_LOGIT = -30_000.0  # finite (no inf - inf); representable in float16, bfloat16, float32
MAX_PERIOD = 10_000.0  # the slowest sinusoid of the time features has this period (in t units)
ROTARY_BASE = 10_000.0



def sinusoidal_features(t: torch.Tensor, dim: int = TIME_FREQUENCY_DIM) -> torch.Tensor:
    """(B,) -> (B, dim): [cos(t·f_j), sin(t·f_j)], f_j = MAX_PERIOD^(-j / (dim/2)).

    The raw time t in [0, 1] is used, unscaled, as in the paper's code (its
    ``TimestepEmbedder`` is fed t itself), so most features are near-constant over
    [0, 1]: the slow ones act as a bias and the MLP reads t from the fast ones.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=t.device,
                                                           dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedding(nn.Module):
    """t (B,) -> conditioning vector (B, cond_dim), before the SiLU (DiT.conditioning)."""

    def __init__(self, cond_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIME_FREQUENCY_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    @property
    def last_layer(self) -> nn.Linear:
        return self.mlp[-1]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_features(t).to(self.last_layer.weight.dtype))


def rotary_tables(length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos and sin of the rotary angles, (L, head_dim / 2) each: angle(l, j) = l·base^(-2j/hd)."""
    inv_freq = 1.0 / ROTARY_BASE ** (torch.arange(0, head_dim, 2, device=device).float()
                                     / head_dim)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[j], x[j + hd/2]) of each head by angle(l, j). x: (B, H, L, hd).

    The non-interleaved (half-split) convention of flash-attn's rotary, which the
    paper's code uses: its released q/k weights load without a permutation.
    """
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.to(x.dtype)


def padded_vocab(vocab_size: int) -> int:
    """V rounded up to a multiple of VOCAB_ALIGN."""
    return -(-vocab_size // VOCAB_ALIGN) * VOCAB_ALIGN


def pad_vocab_rows(x: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """A (V, ...) tensor with rows appended up to ``padded_vocab(V)``, filled with ``value``;
    differentiable (the pads' gradient is dropped). ``x`` itself when V is aligned."""
    pad = padded_vocab(x.shape[0]) - x.shape[0]
    if not pad:
        return x
    return torch.cat([x, x.new_full((pad, *x.shape[1:]), value)])


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, cond_dim: int, mlp_ratio: int,
                 dropout: float, attn_softcap: float | None = None, causal: bool = False) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"model.hidden_size={hidden} is not divisible by "
                             f"model.n_heads={heads}")
        self.heads, self.attn_softcap, self.causal = heads, attn_softcap, causal
        if attn_softcap is not None:
            prepare_softcap(attn_softcap)  # outside any compiled trace
        self.norm1 = nn.LayerNorm(hidden, bias=False)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = nn.LayerNorm(hidden, bias=False)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_ratio * hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * hidden, hidden))
        self.dropout = nn.Dropout(dropout)
        self.modulation = nn.Linear(cond_dim, 6 * hidden)  # adaLN-zero: zeroed in init
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        # the paper's qkv layout: rows (three, heads, head_dim)
        q, k, v = rearrange(self.qkv(modulate(self.norm1(x), shift1, scale1)),
                            "b l (three h d) -> three b h l d", three=3, h=self.heads)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        a = attention(q, k, v, self.attn_softcap, self.causal)
        a = self.attn_out(rearrange(a, "b h l d -> b l (h d)"))
        x = x + gate1[:, None] * self.dropout(a)
        m = self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x + gate2[:, None] * self.dropout(m)


class OutputLayer(nn.Module):
    def __init__(self, hidden: int, cond_dim: int, vocab_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, bias=False)
        self.modulation = nn.Linear(cond_dim, 2 * hidden)
        self.linear = nn.Linear(hidden, vocab_size)
        for layer in (self.modulation, self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def features(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The linear's input: adaLN-modulated LayerNorm of x, (B, L, D) -> (B, L, D)."""
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return modulate(self.norm(x), shift, scale)

    def padded_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear's weight (V', D) and bias (V',) over the padded vocabulary V' (pad rows
        zero, pad biases PAD_LOGIT): ``x @ Wᵀ + b`` gives the logits with aligned strides."""
        return pad_vocab_rows(self.linear.weight), pad_vocab_rows(self.linear.bias, PAD_LOGIT)

    def padded_logits(self, features: torch.Tensor) -> torch.Tensor:
        """``features @ Wᵀ + b`` over V' (..., V'), pads at PAD_LOGIT."""
        return F.linear(features, *self.padded_weights())

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Logits (..., V): a view of the padded product's first V columns."""
        return self.padded_logits(self.features(x, c))[..., :self.linear.out_features]


class DiT(nn.Module):
    """DiT over continuous inputs.

    The interface the flows use (flow/), every tensor over the vocabulary V:

    * ``logits(h, t, t2=None)``: h (B, L, D) -> logits (B, L, V) (also ``forward``). ``t``
      feeds the time embedding; with ``double_temb`` a second embedding of ``t2`` is added
      to it before the SiLU (docs/math.md §5: the flow map's target time);
    * ``cross_entropy(h, t, tokens, t2=None, weights=None)``: ``-log softmax(logits)[x]`` per
      token (B, L), or with ``weights`` (B, L) the scalar ``Σ weights·CE``, through the fused
      linear + cross-entropy of ``speed`` (``SpeedOptions.fused_ce``): the logits are not
      formed;
    * ``project(v)``: ``v @ E`` for v (..., V) -> (..., D);
    * ``features(h, t, t2)`` -> (hidden states, conditioning), then per chunk of positions
      ``head(hidden, c)`` (logits) or ``denoised(hidden, c)`` (``softmax(f) @ E`` and
      ``argmax f``): the samplers' entry points, which keep (B, L, V) tensors to one chunk.

    ``h`` may also be a function ``network -> (B, L, D)`` (e.g. the noisy input
    ``x_gamma @ E`` of flow/path.py, which reads ``input_embedding``): it is called inside
    ``forward``. Under FSDP (strategy=fsdp) that is where the sharded weights are gathered,
    and where the gradient through ``E`` reaches them before it is reduced across ranks.

    ``speed`` (``speed.SpeedOptions``): the fused CE's backend and kernels; the default runs
    the plain PyTorch math.
    """

    sampling_entry_points = ("features", "head", "denoised")  # speed.compile.compile_for_sampling

    def __init__(self, vocab_size: int, length: int, hidden_size: int, n_blocks: int,
                 n_heads: int, cond_dim: int, dropout: float = 0.1, mlp_ratio: int = 4,
                 double_temb: bool = False, attn_softcap: float | None = 50.0,
                 causal: bool = False, speed: SpeedOptions | None = None) -> None:
        super().__init__()
        self.vocab_size, self.length, self.hidden_size = vocab_size, length, hidden_size
        self.double_temb = double_temb
        self.speed = speed if speed is not None else SpeedOptions()
        if attn_softcap is not None and not attn_softcap > 0:
            raise ValueError(f"model.attn_softcap={attn_softcap}: use a positive cap or null")
        # (V, D), initialised like nn.Linear / the paper's EmbeddingLayer: kaiming-uniform with
        # a=sqrt(5) on a (V, D) tensor, i.e. U(-1/sqrt(D), 1/sqrt(D))
        self.input_embedding = nn.Parameter(torch.empty(vocab_size, hidden_size))
        nn.init.kaiming_uniform_(self.input_embedding, a=math.sqrt(5))
        self.time_embedding = TimeEmbedding(cond_dim)
        self.second_time_embedding = TimeEmbedding(cond_dim) if double_temb else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, n_heads, cond_dim, mlp_ratio, dropout,
                                             attn_softcap, causal)
                                    for _ in range(n_blocks))
        self.output_layer = OutputLayer(hidden_size, cond_dim, vocab_size)
        cos, sin = rotary_tables(length, hidden_size // n_heads, torch.device("cpu"))
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)

    # ---- input side: linear maps of E (docs/math.md §3) ----------------------
    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Clean one-hot input e(x) @ E = E[x]: (B, L) -> (B, L, D)."""
        return F.embedding(x, self.input_embedding)

    def embed_state(self, z: torch.Tensor) -> torch.Tensor:
        """Dense projection z @ E: (B, L, V) -> (B, L, D), in z's dtype."""
        return z @ self.input_embedding.to(z.dtype)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """``v @ E``: (..., V) -> (..., D) in v's dtype (float32 accumulation), autocast off,
        through the aligned product (v and E padded with zeros to V')."""
        if v.shape[-1] != self.vocab_size:
            raise ValueError(f"project: last axis {v.shape[-1]}, the vocabulary is "
                             f"{self.vocab_size}")
        e = pad_vocab_rows(self.input_embedding).to(v.dtype)
        with torch.autocast(device_type=v.device.type, enabled=False):
            return F.pad(v, (0, e.shape[0] - v.shape[-1])) @ e

    # ---- body -----------------------------------------------------------------
    def conditioning(self, t: torch.Tensor, t2: torch.Tensor | None = None) -> torch.Tensor:
        """SiLU(mlp(t) [+ mlp'(t2)]): (B,) [, (B,)] -> (B, cond_dim)."""
        c = self.time_embedding(t)
        if self.second_time_embedding is not None:
            if t2 is None:
                raise ValueError("this backbone has double_temb=True: pass the second time t2")
            c = c + self.second_time_embedding(t2)
        elif t2 is not None:
            raise ValueError("t2 given to a backbone built with double_temb=False "
                             "(set algo.double_temb=True for flow-map students)")
        return F.silu(c)

    def features(self, h: torch.Tensor, t: torch.Tensor,
                 t2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) -> final hidden states (B, L, D) and conditioning (B, cond)."""
        if h.shape[1] > self.length:
            raise ValueError(f"input length {h.shape[1]} exceeds model.length={self.length}")
        c = self.conditioning(t, t2)
        rotary = (self.rotary_cos[: h.shape[1]], self.rotary_sin[: h.shape[1]])
        for block in self.blocks:
            h = block(h, c, rotary)
        return h, c

    def head(self, hidden: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, L', D) -> logits (B, L', V); callable on a chunk of positions."""
        return self.output_layer(hidden, c)

    @torch.no_grad()
    def denoised(self, hidden: torch.Tensor, c: torch.Tensor, project: bool = True,
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The x1 prediction through E for a chunk of positions: (B, L', D) ->
        (``softmax(f) @ E`` (B, L', D), ``argmax f`` (B, L')), f the logits.

        The softmax and ``p @ E`` run with autocast off in float32 (float64 for a float64
        network). ``project=False``: ``(None, argmax f)``, without the product."""
        logits = self.output_layer.padded_logits(self.output_layer.features(hidden, c))
        tokens = logits[..., :self.vocab_size].argmax(dim=-1)
        if not project:
            return None, tokens
        p = softmax_wide(logits)  # exactly 0 on the pads
        with torch.autocast(device_type=p.device.type, enabled=False):
            return p @ pad_vocab_rows(self.input_embedding).to(p.dtype), tokens

    def forward(self, h: torch.Tensor | Callable[[DiT], torch.Tensor], t: torch.Tensor,
                t2: torch.Tensor | None = None,
                output: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                | None = None) -> torch.Tensor:
        """Logits (B, L, V). ``output`` (what ``cross_entropy`` passes, so that the loss runs
        inside the compiled forward): ``output(head features (B, L, D), weight (V', D),
        bias (V',))`` is returned instead, over the output layer's padded weights."""
        if callable(h):
            h = h(self)
        hidden, c = self.features(h, t, t2)
        if output is not None:
            return output(self.output_layer.features(hidden, c),
                          *self.output_layer.padded_weights())
        return self.head(hidden, c)

    def logits(self, h: torch.Tensor | Callable[[DiT], torch.Tensor], t: torch.Tensor,
               t2: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V) in the network's output dtype (bf16 under autocast); h is taken to
        the weights' dtype and the times to float32."""
        if not callable(h):
            h = h.to(self.input_embedding.dtype)
        return self(h, t.float(), None if t2 is None else t2.float())

    def cross_entropy(self, h: torch.Tensor | Callable[[DiT], torch.Tensor], t: torch.Tensor,
                      tokens: torch.Tensor, t2: torch.Tensor | None = None,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
        """``-log softmax(logits(h, t, t2))[tokens]`` per token (B, L), float32 (float64 for a
        float64 network); with ``weights`` (B, L) the scalar ``Σ weights·CE``. The pads of V'
        carry no probability, so the CE over V' is the CE over V."""
        speed = self.speed
        return self(h, t, t2, output=lambda features, weight, bias: linear_cross_entropy(
            features, weight, bias, tokens, weights, speed))

    def logits_from_state(self, z: torch.Tensor, t: torch.Tensor,
                          t_next: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V) for a one-hot-space state z (B, L, V) at time t (B,).

        The network input is ``z @ E`` (docs/math.md §3); ``t_next`` (B,) is the
        second time of a double-time-embedding backbone (the flow map's target time).
        """
        return self(self.embed_state(z), t, t_next)


def build_backbone(model_cfg, vocab_size: int, double_temb: bool, causal: bool = False,
                   speed: SpeedOptions | None = None) -> DiT:
    """Backbone from the ``model`` config group (configs/model/*.yaml); ``causal`` comes from
    the algorithm (algo=ar), not from the model config; ``speed``: see ``DiT``."""
    if model_cfg.type != "dit":
        raise ValueError(f"model.type={model_cfg.type!r} is not supported; use 'dit'")
    return DiT(vocab_size=vocab_size, length=model_cfg.length,
               hidden_size=model_cfg.hidden_size, n_blocks=model_cfg.n_blocks,
               n_heads=model_cfg.n_heads, cond_dim=model_cfg.cond_dim,
               dropout=model_cfg.dropout, mlp_ratio=model_cfg.mlp_ratio,
               double_temb=double_temb, attn_softcap=model_cfg.attn_softcap,
               causal=causal, speed=speed)
