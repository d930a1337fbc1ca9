"""Compilation and sharding, applied to the networks from outside the algorithms.

The Lightning modules in ``algo.py`` decide *whether* (config keys) and call these
functions; *how* a network is compiled or sharded lives here only:

* ``compile_network``: ``torch.compile`` with static shapes (kernels specialised to the
  training shapes); a new batch size (validation, the last batch) recompiles instead.
* ``compile_for_sampling``: the same for the samplers' entry points (``features``,
  ``head``), which do not go through ``forward``.
* ``shard_fsdp``: FSDP2 over a data-parallel mesh, each DiT block one unit, the rest of
  the backbone one more, then any extra modules (the loss weighting); the EMA is sharded
  like the parameters it shadows.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)


def compile_requested(config: DictConfig) -> bool:
    """``training.compile`` (the paper's ``DIT_USE_COMPILE=TRUE`` maps onto it in
    configs/config.yaml)."""
    return bool(config.training.compile)


# Compiled graphs per code object. Every DiT shares one ``forward``, and each instance
# (teacher, stage-1 map, student) under each grad mode (teachers and the student's
# bootstrap targets without gradients) and each batch shape (validation) is one more graph:
# a distillation step needs more than torch's default of 8, past which the forward ran eager
# (seen on an H200: "hit config.recompile_limit (8) ... GLOBAL_STATE changed: grad_mode").
RECOMPILE_LIMIT = 64


def room_for_graphs() -> None:
    """Raise torch's recompile limit to RECOMPILE_LIMIT (never lower it)."""
    import torch._dynamo.config as dynamo_config

    if dynamo_config.recompile_limit < RECOMPILE_LIMIT:
        dynamo_config.recompile_limit = RECOMPILE_LIMIT


_TUNING = {"coordinate_descent": False}  # training.compile_tuning (use_compile_tuning)


def use_compile_tuning(enabled: bool) -> None:
    """Whether later compiles on CUDA add inductor's coordinate-descent tuning (each compiled
    kernel's block sizes and warps searched around inductor's choice: +1.7% on the train step
    at B = 32, 413,261 vs 406,353 tokens/s on an H200, for ~90 s more compile at start-up;
    bench/results/train_h200_round11.txt)."""
    if enabled and not torch.cuda.is_available():
        log.warning("training.compile_tuning=true: it tunes CUDA kernels; this machine compiles "
                    "for the CPU with inductor's defaults")
    elif enabled != _TUNING["coordinate_descent"]:
        log.info("compile tuning (inductor coordinate_descent_tuning) %s",
                 "on: the first step's compile takes longer" if enabled else "off")
    _TUNING["coordinate_descent"] = enabled


def compile_options() -> dict | None:
    """Inductor options of every network compile: on a CUDA machine, autotuned FlexAttention
    (the soft-capped attention's block sizes and warps, forward and backward: 2.66 -> 2.26 ms
    per layer at B = 32 on an H200, bench/components.py) with the matrix products left to
    cuBLAS (no Triton GEMM search, so autotuning costs only the attention's candidates), and
    no benchmarking of epilogue fusions into those kernels (with FlexAttention traced into
    the network's graph, twelve blocks' worth of them: round 8's start-up took minutes),
    and coordinate-descent tuning when ``use_compile_tuning`` turned it on.
    None (inductor's defaults) elsewhere."""
    if not torch.cuda.is_available():
        return None
    import torch._inductor.config as inductor_config

    options = {"max_autotune": True, "max_autotune_gemm_backends": "ATEN",
               "benchmark_epilogue_fusion": False}
    # the search's tables would fill the training log at every compiled shape; these keys are
    # newer than some torch versions: set those this one has
    quiet = {"autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
    options.update({k: v for k, v in quiet.items() if hasattr(inductor_config, k)})
    if _TUNING["coordinate_descent"]:
        options["coordinate_descent_tuning"] = True
    return options


def compile_network(network: torch.nn.Module) -> None:
    """Compile ``network``'s forward in place, with static shapes (and room for a graph per
    network instance, grad mode and batch shape: ``RECOMPILE_LIMIT``)."""
    room_for_graphs()
    network.compile(dynamic=False, options=compile_options())


def compile_for_sampling(network: torch.nn.Module) -> bool:
    """Compile the two entry points the samplers call, ``features`` and ``head``
    (flow/sampling.py calls them directly, not ``forward``), with static shapes; a network
    without them (the exact denoiser) is left as it is. Returns whether it compiled."""
    from models.dit import DiT  # here: models.dit is the backbone this module wraps

    if not isinstance(network, DiT):
        return False
    room_for_graphs()  # teacher and student share DiT.features' code object
    options = compile_options()
    network.features = torch.compile(network.features, dynamic=False, options=options)
    network.head = torch.compile(network.head, dynamic=False, options=options)
    return True


def shard_fsdp(backbone: torch.nn.Module, extra: list[torch.nn.Module], ema, mesh,
               reshard_after_forward: bool, compile_blocks: bool) -> None:
    """Shard ``backbone`` block by block (compiling each block first when asked), then its
    remaining weights, then each of ``extra``; place the EMA's shadows like the parameters.
    A parameter left unsharded is an error (its gradient would not be reduced)."""
    if isinstance(backbone, FSDPModule):
        return
    for block in backbone.blocks:
        if compile_blocks:
            compile_network(block)
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(backbone, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for module in extra:
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    left = [n for module in (backbone, *extra) for n, p in module.named_parameters()
            if not isinstance(p, DTensor)]
    if left:
        raise RuntimeError(f"strategy=fsdp left parameters unsharded: {left[:5]}")
    ema.shard_like(backbone)
    log.info("strategy=fsdp: %d blocks + the backbone's remaining weights sharded over %d ranks "
             "(reshard_after_forward=%s)", len(backbone.blocks), mesh.size(),
             reshard_after_forward)
