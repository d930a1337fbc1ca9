"""Diffusion Transformer over continuous token states.

The backbone knows nothing about flows. It maps a D-dimensional input state
``h`` (B, L, D) and one or two times to logits over the vocabulary
(B, L, V). How ``h`` is made from a continuous one-hot-space state ``z``
(B, L, V) is exposed as three linear maps of the input embedding ``E``
(V, D): ``embed_state(z) = z @ E``, ``embed_tokens(x) = E[x]`` and
``input_embedding`` itself for the D-space path (flm-math §3).

Blocks: pre-LayerNorm attention + MLP, adaLN-zero modulation from the time
conditioning, rotary positions, bidirectional SDPA attention, untied
input/output embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

TIME_FREQUENCY_DIM = 256  # sinusoidal features fed to the time MLP
TIME_SCALE = 1000.0  # t in [0, 1] is spread over the sinusoid periods like DiT's steps
MAX_PERIOD = 10_000.0
ROTARY_BASE = 10_000.0


def sinusoidal_features(t: torch.Tensor, dim: int = TIME_FREQUENCY_DIM) -> torch.Tensor:
    """(B,) -> (B, dim) sin/cos features of ``TIME_SCALE * t``."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=t.device,
                                                           dtype=torch.float32) / half)
    args = (TIME_SCALE * t.float())[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedding(nn.Module):
    """t (B,) -> conditioning vector (B, cond_dim)."""

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
    inv_freq = 1.0 / ROTARY_BASE ** (torch.arange(0, head_dim, 2, device=device).float()
                                     / head_dim)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()  # (L, head_dim / 2) each


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by position-dependent angles. x: (B, H, L, hd)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, cond_dim: int, mlp_ratio: int,
                 dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"model.hidden_size={hidden} is not divisible by "
                             f"model.n_heads={heads}")
        self.heads = heads
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
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).chunk(3, dim=-1)
        q, k, v = (y.unflatten(-1, (self.heads, -1)).transpose(1, 2) for y in (q, k, v))
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        a = F.scaled_dot_product_attention(q, k, v)  # bidirectional
        a = self.attn_out(a.transpose(1, 2).flatten(-2))
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

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x, c))


class DiT(nn.Module):
    """DiT over continuous inputs.

    ``forward(h, t, t2=None)``: h (B, L, D) -> logits (B, L, V). ``t`` feeds
    the time embedding; with ``double_temb`` a second embedding of ``t2`` is
    added to it (flm-math §5: the flow map's target time).

    ``h`` may also be a function ``network -> (B, L, D)`` (e.g. the noisy input
    ``x_gamma @ E`` of flow/path.py, which reads ``input_embedding``): it is
    called inside ``forward``. Under FSDP (strategy=fsdp) that is where the
    sharded weights are gathered, and where the gradient through ``E`` reaches
    them before it is reduced across ranks.
    """

    def __init__(self, vocab_size: int, length: int, hidden_size: int, n_blocks: int,
                 n_heads: int, cond_dim: int, dropout: float = 0.1, mlp_ratio: int = 4,
                 double_temb: bool = False, embedding_init_std: float = 0.02) -> None:
        super().__init__()
        self.vocab_size, self.length, self.hidden_size = vocab_size, length, hidden_size
        self.double_temb = double_temb
        self.input_embedding = nn.Parameter(torch.randn(vocab_size, hidden_size)
                                            * embedding_init_std)
        self.time_embedding = TimeEmbedding(cond_dim)
        self.second_time_embedding = TimeEmbedding(cond_dim) if double_temb else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, n_heads, cond_dim, mlp_ratio, dropout)
                                    for _ in range(n_blocks))
        self.output_layer = OutputLayer(hidden_size, cond_dim, vocab_size)
        cos, sin = rotary_tables(length, hidden_size // n_heads, torch.device("cpu"))
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)

    # ---- input side: linear maps of E (flm-math §3) -------------------------
    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Clean one-hot input e(x) @ E = E[x]: (B, L) -> (B, L, D)."""
        return F.embedding(x, self.input_embedding)

    def embed_state(self, z: torch.Tensor) -> torch.Tensor:
        """Dense projection z @ E: (B, L, V) -> (B, L, D), in z's dtype."""
        return z @ self.input_embedding.to(z.dtype)

    # ---- body -----------------------------------------------------------------
    def conditioning(self, t: torch.Tensor, t2: torch.Tensor | None = None) -> torch.Tensor:
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

    def head_features(self, hidden: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, L', D) -> the output linear's input (B, L', D) (modulated, normalised)."""
        return self.output_layer.features(hidden, c)

    def head(self, hidden: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, L', D) -> logits (B, L', V); callable on a chunk of positions."""
        return self.output_layer.linear(self.head_features(hidden, c))

    def forward(self, h: torch.Tensor | Callable[[DiT], torch.Tensor], t: torch.Tensor,
                t2: torch.Tensor | None = None,
                output: Callable[[torch.Tensor, nn.Linear], torch.Tensor] | None = None,
                ) -> torch.Tensor:
        """Logits (B, L, V); with ``output``, ``output(head_features (B, L, D), linear)``
        instead (a fused linear + loss that never forms the logits: flow/losses.py)."""
        if callable(h):
            h = h(self)
        hidden, c = self.features(h, t, t2)
        if output is not None:
            return output(self.head_features(hidden, c), self.output_layer.linear)
        return self.head(hidden, c)


def build_backbone(model_cfg, vocab_size: int, double_temb: bool) -> DiT:
    """Backbone from the ``model`` config group (configs/model/*.yaml)."""
    if model_cfg.type != "dit":
        raise ValueError(f"model.type={model_cfg.type!r} is not supported; use 'dit'")
    return DiT(vocab_size=vocab_size, length=model_cfg.length,
               hidden_size=model_cfg.hidden_size, n_blocks=model_cfg.n_blocks,
               n_heads=model_cfg.n_heads, cond_dim=model_cfg.cond_dim,
               dropout=model_cfg.dropout, mlp_ratio=model_cfg.mlp_ratio,
               double_temb=double_temb, embedding_init_std=model_cfg.embedding_init_std)
