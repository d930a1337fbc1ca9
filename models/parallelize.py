"""Sharding, applied to the networks from outside the algorithms.

The Lightning modules in algo/modules.py decide *whether* (config keys) and call these
functions; *how* a network is sharded lives here (how it is compiled: speed/compile.py):

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

from speed.compile import compile_network

log = logging.getLogger(__name__)


def compile_requested(config: DictConfig) -> bool:
    """``training.compile`` (the paper's ``DIT_USE_COMPILE=TRUE`` maps onto it in
    configs/config.yaml)."""
    return bool(config.training.compile)


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
