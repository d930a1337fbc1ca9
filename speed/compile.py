"""``torch.compile`` applied from outside: networks, a sampler's entry points, whole losses.

Every compile here has static shapes (kernels specialised to the training shapes; a new
batch size, e.g. validation's, compiles one more graph) and the inductor options of
``compile_options``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from speed import flex_blocks
from speed.options import SpeedOptions

log = logging.getLogger(__name__)

# Compiled graphs per code object. Every DiT shares one ``forward``, and each instance
# (teacher, stage-1 map, student) under each grad mode (teachers and the student's
# bootstrap targets without gradients) and each batch shape (validation) is one more graph:
# a distillation step needs more than torch's default of 8, past which the forward ran eager
# ("hit config.recompile_limit (8) ... GLOBAL_STATE changed: grad_mode").
RECOMPILE_LIMIT = 64


def use_cache_dir(directory: str | os.PathLike) -> Path:
    """Keep every on-disk compile cache in ``directory``: inductor's (compiled graphs,
    kernels, autotuning results; ``TORCHINDUCTOR_CACHE_DIR``, read at each lookup) and
    Triton's (``TRITON_CACHE_DIR`` = ``directory``/triton, unless already set: the fused CE's
    own kernel is compiled by Triton directly). A later run with the same shapes there loads
    what it finds instead of compiling. Process-wide environment settings."""
    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
    return path


def room_for_graphs() -> None:
    """Raise dynamo's (process-wide) recompile limit to RECOMPILE_LIMIT, never lower it.
    Called by the compile helpers below, which are what need the room."""
    import torch._dynamo.config as dynamo_config  # importing dynamo costs seconds: on use only

    if dynamo_config.recompile_limit < RECOMPILE_LIMIT:
        dynamo_config.recompile_limit = RECOMPILE_LIMIT


@functools.cache
def _log_block_source() -> None:
    """Log, once per process, where this GPU's FlexAttention block sizes come from (the
    attention seam runs inside compiled traces, where it cannot log)."""
    log.info(flex_blocks.summary())


def compile_options(extra: dict | None = None) -> dict | None:
    """Inductor options of every compile. On a CUDA machine: FlexAttention's block sizes
    measured for this GPU (``speed.flex_blocks``; then no template is autotuned) or else
    autotuned (the soft-capped attention's block sizes and warps, forward and backward:
    2.66 -> 2.26 ms per layer at B = 32 on an H200, bench/components.py); the fused pointwise
    and reduction kernels' launch configurations benchmarked at their first call
    (``max_autotune_pointwise``, which ``max_autotune`` implies; without it the train step is
    slower, bench/RESULTS.md); the matrix products left to cuBLAS (no Triton
    GEMM search); and no benchmarking of epilogue fusions into those kernels (with
    FlexAttention traced into the network's graph, twelve blocks' worth of them would take
    minutes at start-up). None (inductor's defaults) elsewhere. ``extra``: options over these
    (bench/train_step.py --inductor)."""
    if not torch.cuda.is_available():
        return dict(extra) if extra else None
    import torch._inductor.config as inductor_config  # seconds to import: on use only

    _log_block_source()
    options = {"max_autotune": not flex_blocks.measured_here(), "max_autotune_pointwise": True,
               "max_autotune_gemm_backends": "ATEN", "benchmark_epilogue_fusion": False}
    # the search's tables would fill the training log at every compiled shape; these keys are
    # newer than some torch versions: set those this one has
    quiet = {"autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
    options.update({k: v for k, v in quiet.items() if hasattr(inductor_config, k)})
    options.update(extra or {})
    return options


def compile_network(network: torch.nn.Module, extra_options: dict | None = None) -> None:
    """Compile ``network``'s forward in place, with static shapes."""
    room_for_graphs()
    network.compile(dynamic=False, options=compile_options(extra_options))


def compile_for_sampling(network: torch.nn.Module) -> bool:
    """Compile the entry points a sampler calls instead of ``forward`` (the names in the
    network's ``sampling_entry_points``, e.g. the DiT's ``features``, ``head``, ``denoised``), with
    static shapes; a network without such entry points (the exact denoiser) is left as it
    is. Returns whether it compiled."""
    names = getattr(network, "sampling_entry_points", ())
    if not names:
        return False
    room_for_graphs()  # teacher and student share the same methods' code objects
    options = compile_options()
    for name in names:
        setattr(network, name, torch.compile(getattr(network, name), dynamic=False,
                                             options=options))
    return True


def compile_loss(fn: Callable, options: SpeedOptions) -> Callable:
    """``fn`` (a loss: networks and tensors in, a tensor out) compiled whole with static shapes
    when ``options.compile``, for calls whose first tensor argument is on CUDA; ``fn`` itself
    otherwise. The networks it calls are traced into its graph with it, so the (B, L, V)
    algebra between them fuses into few passes over memory (eagerly, each op is one)."""
    if not options.compile:
        return fn
    compiled: list[Callable] = []

    def run(*args, **kwargs):
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        if first.device.type != "cuda":
            return fn(*args, **kwargs)
        if not compiled:
            room_for_graphs()
            compiled.append(torch.compile(fn, dynamic=False, options=compile_options()))
        return compiled[0](*args, **kwargs)

    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run
