"""FlexAttention's block sizes, measured once per GPU instead of autotuned at every start.

Inductor's autotuning (``max_autotune``) picks the soft-capped attention's forward and
backward block sizes (and warps, pipeline stages) by compiling and timing each candidate when
a network compiles: most of a cold start's minute of autotuning, paid again by every new
machine. ``MEASURED`` holds the winners of that search for the presets' attention (head size
64, bf16 autocast), found with ``bench/flex_configs.py``; on a GPU listed there no compile
autotunes its templates (``speed.compile.compile_options``) and FlexAttention gets those
sizes as its ``kernel_options``; other head sizes and dtypes on that GPU get inductor's
default sizes (the run's log says which). A GPU not listed autotunes. What this saves at
start-up, and that the step stays as fast: bench/RESULTS.md.
"""

from __future__ import annotations

import torch

# (CUDA compute capability, head size, dtype) -> FlexAttention kernel_options, ``fwd_*`` for
# the forward kernel, ``bwd_*`` for the backward's. (9, 0): inductor's autotuning winners on
# an H100 at B = 32, H = 12, L = 1,024, softcap 50 (at L = 128: the same but for 4 backward
# stages); fixed, they time as autotuned (bench/flex_configs.py, bench/RESULTS.md). The H200
# shares the architecture; it was not measured.
MEASURED: dict[tuple[tuple[int, int], int, torch.dtype], dict[str, int]] = {
    ((9, 0), 64, torch.bfloat16): {
        "fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3,
        "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
        "bwd_num_warps": 4, "bwd_num_stages": 3,
    },
}

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
    """What sets FlexAttention's block sizes for these inputs, for the run's log (whether
    inductor's own are autotuned or its defaults is this GPU's ``summary``)."""
    found = kernel_options(head_size, dtype)
    if found is not None:
        return f"block sizes measured for this GPU ({found})"
    return f"inductor's block sizes (none measured for head size {head_size}, {dtype})"


def summary() -> str:
    """This GPU's source of FlexAttention block sizes, for the run's log."""
    here = capability()
    shapes = [f"head size {key[1]}, {key[2]}" for key in MEASURED if key[0] == here]
    if shapes:
        return (f"FlexAttention block sizes measured for compute capability {here} "
                f"({'; '.join(shapes)}; other shapes: inductor's defaults), no autotuning")
    return (f"FlexAttention block sizes autotuned by inductor at each compile (none measured "
            f"for compute capability {here}: bench/flex_configs.py)")
