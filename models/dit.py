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

import functools
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

TIME_FREQUENCY_DIM = 256  # sinusoidal features fed to the time MLP
# The vocabulary side of every V-sized product is padded to a multiple of VOCAB_ALIGN rows:
# cuBLAS's fast kernels need 16-byte-aligned leading dimensions, and V = 50,258 (GPT-2 + 1)
# has none; padded, the output layer's products ran 2.6x and the samplers' p @ E 2.8x faster
# on an H200 (bench/vocab_align.py, bench/results/vocab_align_h200.txt). Pad rows of the
# output weight and of E are zero and pad logits are PAD_LOGIT, so a softmax over the padded
# logits puts exactly 0 on the pads (exp(PAD_LOGIT - max) underflows to 0 in any float dtype
# unless every real logit is below -29,000) and nothing of a pad reaches a result.
VOCAB_ALIGN = 128
PAD_LOGIT = -30_000.0  # finite (no inf - inf); representable in float16, bfloat16, float32
MAX_PERIOD = 10_000.0  # the slowest sinusoid of the time features has this period (in t units)
ROTARY_BASE = 10_000.0

log = logging.getLogger(__name__)


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


# ---- attention: softmax(softcap·tanh(q k^T / (sqrt(hd)·softcap))) v --------------------------
_logged_backends: set[str] = set()
_compiled_flex: Callable | None = None
_causal_block_masks: dict[tuple[int, str], object] = {}


def _log_backend(name: str) -> None:
    """Log the attention backend once (not from inside a torch.compile trace: a graph break)."""
    if not torch.compiler.is_compiling() and name not in _logged_backends:
        _logged_backends.add(name)
        log.info("attention backend: %s", name)


@functools.cache
def _flash_attn_softcap() -> Callable | None:
    """flash_attn_func when flash-attn >= 2.6 (the version with ``softcap``) is importable.

    flash-attn-4 alone also makes ``flash_attn`` importable (a namespace package holding
    ``flash_attn.cute``, without ``flash_attn_func`` or a version): that is not flash-attn 2.
    """
    try:
        import flash_attn
    except ImportError:
        return None
    version = getattr(flash_attn, "__version__", None)
    if version is None or not hasattr(flash_attn, "flash_attn_func"):
        return None
    major, minor = (int(p) for p in version.split(".")[:2])
    return flash_attn.flash_attn_func if (major, minor) >= (2, 6) else None


# resolved once at import: an import attempted inside a compiled trace is a graph break
_FLASH2 = _flash_attn_softcap()


FLEX_SEPARATE = False  # bench/train_step.py --flex-separate: see _flex_attention


def _flex_attention() -> Callable:
    """torch's FlexAttention: inside a compiled network's trace the function itself, traced
    into the network's graph; outside one (an eager network, a bench) compiled on its own,
    once (lazily: importing this module compiles nothing).

    Until round 9 a compiled network reached the separately compiled one through a graph
    break at every block. In the graph instead, the train step runs 3.4% faster (one H200,
    B = 32: 376,479 vs 364,019 tokens/s) and the host launches one forward and one backward
    graph of the network instead of two of each per block; its first step (compile) takes
    104 s instead of 54, once per run (``compile_options`` keeps that cost down). ``FLEX_SEPARATE = True`` restores the break,
    to measure it.
    """
    global _compiled_flex
    if torch.compiler.is_compiling() and not FLEX_SEPARATE:
        return flex_attention
    if _compiled_flex is None:
        from models.parallelize import compile_options  # here: parallelize imports this module
        _compiled_flex = torch.compile(flex_attention, dynamic=False, options=compile_options())
    return _compiled_flex


def _causal_block_mask(length: int, device: torch.device):
    key = (length, str(device))
    if key not in _causal_block_masks:
        from torch.nn.attention.flex_attention import create_block_mask
        _causal_block_masks[key] = create_block_mask(
            lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, B=None, H=None, Q_LEN=length,
            KV_LEN=length, device=device)
    return _causal_block_masks[key]


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float | None,
                   causal: bool) -> torch.Tensor:
    """The explicit computation (B, H, L, hd) x3 -> (B, H, L, hd); materialises (B, H, L, L).

    Used on the CPU; on CUDA the fused kernels of ``attention`` compute the same.
    """
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _on_cuda(q: torch.Tensor) -> bool:
    return q.device.type == "cuda"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float | None,
              causal: bool) -> torch.Tensor:
    """Scaled dot-product attention with logit soft-capping. (B, H, L, hd) x3 -> (B, H, L, hd).

    ``softcap=None``: plain SDPA. Otherwise the scaled logits are capped as
    ``softcap·tanh(logits / softcap)`` (the paper's flash-attn ``softcap=50``): on CUDA
    by flash-attn >= 2.6 when importable and the inputs are bf16/fp16, else by a compiled
    FlexAttention score_mod (neither materialises the L x L logits); on other devices by
    ``math_attention``. The backend used is logged once.
    """
    backend = _attention_backend(q, softcap)
    if backend == "sdpa":
        _log_backend("sdpa (no softcap)")
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if backend == "math":
        _log_backend(f"math (q k^T, softcap={softcap}, softmax) on {q.device.type}")
        return math_attention(q, k, v, softcap, causal)
    if backend == "flash-attn":
        _log_backend(f"flash-attn softcap={softcap}")
        out = _FLASH2(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                      softcap=softcap)  # flash-attn takes and returns (B, L, H, hd)
        return out.transpose(1, 2)
    _log_backend(f"flex_attention softcap={softcap} ({q.dtype})")
    mask = _causal_block_mask(q.shape[-2], q.device) if causal else None
    return _flex_attention()(q, k, v, score_mod=softcap_score_mod(softcap), block_mask=mask)


def _attention_backend(q: torch.Tensor, softcap: float | None) -> str:
    """sdpa | math | flash-attn | flex, from module constants only: it runs inside compiled
    traces, where an import attempt is a graph break (it was one, at every block)."""
    if softcap is None:
        return "sdpa"
    if not _on_cuda(q):
        return "math"
    if _FLASH2 is not None and q.dtype in (torch.bfloat16, torch.float16):
        return "flash-attn"
    return "flex"


# one score_mod object per (cap, form): compiled graphs guard on the function object
_score_mods: dict[tuple[float, str], Callable] = {}
SOFTCAP_FORMS = ("approx-tanh", "sigmoid", "tanh")
SOFTCAP_FORM = "approx-tanh"  # the form models use; bench/train_step.py --softcap-forms sets it


def softcap_score_mod(softcap: float, form: str | None = None) -> Callable:
    """The FlexAttention score_mod ``s -> softcap·tanh(s / softcap)`` (one object per cap and
    form; a plain dict, not functools.cache, which dynamo warns about and bypasses inside a
    trace). Its tanh, the same function in three forms (bench/components.py times them):

    * ``approx-tanh`` (``SOFTCAP_FORM``, the default): ``models.approx_tanh``, the GPU's
      one-instruction ``tanh.approx.f32`` in the generated CUDA kernels, which is what the
      paper's flash-attn kernel evaluates (``cutlass::fast_tanh``), with its ``1 - tanh²``
      derivative (+7.1% on the train step at B = 32 over ``sigmoid``, one H200);
    * ``sigmoid``: ``2·sigmoid(2x) - 1`` (one exp and one division in Triton; rounds 5-9);
    * ``tanh``: ``torch.tanh`` (Triton's libdevice routine, the slowest).
    """
    form = SOFTCAP_FORM if form is None else form
    if form not in SOFTCAP_FORMS:
        raise ValueError(f"softcap form {form!r}: expected one of {SOFTCAP_FORMS}")
    key = (softcap, form)
    if key not in _score_mods:
        _score_mods[key] = _capped_scores(softcap, form)
    return _score_mods[key]


def _capped_scores(softcap: float, form: str) -> Callable:
    if form == "approx-tanh":
        from models import approx_tanh
        # DiTBlock makes its score_mod before any trace; a cap first met inside a trace gets
        # inductor's "missing lowering" error unless the lowering was registered before
        if not torch.compiler.is_compiling():
            approx_tanh.register_lowering()
        tanh = approx_tanh.tanh_approx
    elif form == "sigmoid":
        def tanh(x):
            return 2.0 * torch.sigmoid(2.0 * x) - 1.0
    else:
        tanh = torch.tanh
    inverse = 1.0 / softcap

    def capped(score, b, h, q_idx, kv_idx):
        return softcap * tanh(score * inverse)

    return capped


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
            softcap_score_mod(attn_softcap)  # made here: inside a compiled trace only read
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

    def logits(self, features: torch.Tensor, padded: bool = False) -> torch.Tensor:
        """``features @ Wᵀ + b`` (..., V) through the padded product; ``padded=True``: the
        (..., V') logits themselves, pads at PAD_LOGIT."""
        out = F.linear(features, *self.padded_weights())
        return out if padded else out[..., :self.linear.out_features]

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x, c))


class DiT(nn.Module):
    """DiT over continuous inputs.

    ``forward(h, t, t2=None)``: h (B, L, D) -> logits (B, L, V). ``t`` feeds
    the time embedding; with ``double_temb`` a second embedding of ``t2`` is
    added to it before the SiLU (docs/math.md §5: the flow map's target time).
    ``logits_from_state(z, t, t_next)`` does the same from a one-hot-space state z.

    ``h`` may also be a function ``network -> (B, L, D)`` (e.g. the noisy input
    ``x_gamma @ E`` of flow/path.py, which reads ``input_embedding``): it is
    called inside ``forward``. Under FSDP (strategy=fsdp) that is where the
    sharded weights are gathered, and where the gradient through ``E`` reaches
    them before it is reduced across ranks.
    """

    def __init__(self, vocab_size: int, length: int, hidden_size: int, n_blocks: int,
                 n_heads: int, cond_dim: int, dropout: float = 0.1, mlp_ratio: int = 4,
                 double_temb: bool = False, attn_softcap: float | None = 50.0,
                 causal: bool = False) -> None:
        super().__init__()
        self.vocab_size, self.length, self.hidden_size = vocab_size, length, hidden_size
        self.double_temb = double_temb
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

    def head_features(self, hidden: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, L', D) -> the output linear's input (B, L', D) (modulated, normalised)."""
        return self.output_layer.features(hidden, c)

    def head(self, hidden: torch.Tensor, c: torch.Tensor, padded: bool = False) -> torch.Tensor:
        """(B, L', D) -> logits (B, L', V); callable on a chunk of positions. ``padded=True``:
        over the padded vocabulary (B, L', V'), pads at PAD_LOGIT (``padded_embedding``)."""
        return self.output_layer.logits(self.head_features(hidden, c), padded)

    def padded_embedding(self) -> torch.Tensor:
        """E with zero rows up to the padded vocabulary (V', D): ``softmax(head(padded=True))
        @ padded_embedding()`` is ``softmax(head()) @ E`` through aligned products."""
        return pad_vocab_rows(self.input_embedding)

    def forward(self, h: torch.Tensor | Callable[[DiT], torch.Tensor], t: torch.Tensor,
                t2: torch.Tensor | None = None,
                output: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                | None = None) -> torch.Tensor:
        """Logits (B, L, V); with ``output``, ``output(head_features (B, L, D), weight (V', D),
        bias (V',))`` instead, the output layer's padded weights (pads: zero rows, biases at
        PAD_LOGIT, so a cross-entropy over V' equals the one over V): a fused linear + loss
        that never forms the logits (flow/losses.py)."""
        if callable(h):
            h = h(self)
        hidden, c = self.features(h, t, t2)
        if output is not None:
            return output(self.head_features(hidden, c), *self.output_layer.padded_weights())
        return self.head(hidden, c)

    def logits_from_state(self, z: torch.Tensor, t: torch.Tensor,
                          t_next: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V) for a one-hot-space state z (B, L, V) at time t (B,).

        The network input is ``z @ E`` (docs/math.md §3); ``t_next`` (B,) is the
        second time of a double-time-embedding backbone (the flow map's target time).
        """
        return self(self.embed_state(z), t, t_next)


def build_backbone(model_cfg, vocab_size: int, double_temb: bool, causal: bool = False) -> DiT:
    """Backbone from the ``model`` config group (configs/model/*.yaml); ``causal`` comes from
    the algorithm (algo=ar), not from the model config."""
    if model_cfg.type != "dit":
        raise ValueError(f"model.type={model_cfg.type!r} is not supported; use 'dit'")
    return DiT(vocab_size=vocab_size, length=model_cfg.length,
               hidden_size=model_cfg.hidden_size, n_blocks=model_cfg.n_blocks,
               n_heads=model_cfg.n_heads, cond_dim=model_cfg.cond_dim,
               dropout=model_cfg.dropout, mlp_ratio=model_cfg.mlp_ratio,
               double_temb=double_temb, attn_softcap=model_cfg.attn_softcap,
               causal=causal)
