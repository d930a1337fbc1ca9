"""Everything in the codebase that exists only to be fast, one seam per use.

* ``speed.options``: ``SpeedOptions``, the run's speed settings, built once from the config
  (``training.compile``, ``training.fused_ce``) and passed explicitly to what needs them;
* ``speed.compile``: compiling a network, a sampler's entry points or a whole loss from
  outside, with the inductor options every compile shares;
* ``speed.attention``: the soft-capped attention's backends (flash-attn 2 when installed,
  FlexAttention with an approximate-tanh score_mod, the plain math on other devices);
* ``speed.flex_blocks``: FlexAttention's block sizes measured per GPU (no autotuning there);
* ``speed.cross_entropy``: the fused linear + cross-entropy over chunks of rows (its Triton
  chunk kernel in ``speed.ce_triton``), behind one function;
* ``speed.kernels``: small elementwise kernels compiled on CUDA (the EMA's lerp).

Each seam has a plain PyTorch form, which runs with speed off (CPU, or
``training.compile=false``) and which the tests compare the fast forms against. This package
imports nothing of the codebase above it: networks are duck-typed.
"""

from speed.options import FUSED_CE_CHOICES, SpeedOptions

__all__ = ["FUSED_CE_CHOICES", "SpeedOptions"]
