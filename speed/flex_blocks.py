"""FlexAttention's block sizes, measured once per GPU instead of autotuned at every start.

Inductor's autotuning (``max_autotune``) picks the soft-capped attention's forward and
backward block sizes (and warps, pipeline stages) by compiling and timing each candidate when
a network compiles: most of a cold start's minute of autotuning, paid again by every new
machine. ``MEASURED`` holds the winners of that search for the shapes the presets run,
found with ``bench/flex_configs.py`` (bench/RESULTS.md); on a GPU listed there every compile
skips autotuning (``speed.compile.compile_options``) and FlexAttention gets those sizes as
its ``kernel_options``; other head sizes and dtypes on that GPU get inductor's default sizes.
A GPU not listed autotunes, as before.
"""

from __future__ import annotations

import torch

# (CUDA compute capability, head size, dtype) -> FlexAttention kernel_options, ``fwd_*`` for
# the forward kernel, ``bwd_*`` for the backward's; measured with bench/flex_configs.py at
# B = 32, H = 12, L = 1,024 and 128, softcap 50 (results/flex_configs_*.txt)
MEASURED: dict[tuple[tuple[int, int], int, torch.dtype], dict[str, int]] = {}

_capability: list[tuple[int, int] | None] = []


def capability() -> tuple[int, int] | None:
    """The current CUDA device's compute capability (None without CUDA), read once."""
    if not _capability:
        _capability.append(torch.cuda.get_device_capability() if torch.cuda.is_available()
                           else None)
    return _capability[0]


def measured_here() -> bool:
    """Whether ``MEASURED`` has block sizes for this machine's GPU (then nothing autotunes)."""
    here = capability()
    return here is not None and any(key[0] == here for key in MEASURED)


def kernel_options(head_size: int, dtype: torch.dtype) -> dict[str, int] | None:
    """The measured kernel_options for attention of ``head_size`` in ``dtype`` on this GPU;
    None (inductor's choice: autotuned, or its default where ``measured_here``) otherwise."""
    return MEASURED.get((capability(), head_size, dtype))


def describe(head_size: int, dtype: torch.dtype) -> str:
    """What sets FlexAttention's block sizes for these inputs, for the run's log."""
    found = kernel_options(head_size, dtype)
    if found is not None:
        return f"block sizes measured for this GPU ({found})"
    if measured_here():
        return f"inductor's default block sizes (none measured for head size {head_size}, {dtype})"
    return "block sizes autotuned by inductor"
