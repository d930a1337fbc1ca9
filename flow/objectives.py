"""The distillation objective of each algorithm and input path, chosen in one place.

``algo.py`` asks once (at construction) for the loss of its algorithm and calls it; the
losses themselves are the plain functions of ``flow/flow_map.py`` (docs/math.md §5, §6).
``dspace`` losses take the joint noise ``eps @ [E_1 | ...]``, ``reference`` losses the
materialised ``eps`` (B, L, V); ``flow/path.distillation_noise`` draws the matching one.
"""

from __future__ import annotations

from collections.abc import Callable

from flow.flow_map import (
    flow_map_matching_loss,
    flow_map_matching_loss_reference,
    semigroup_loss,
    semigroup_loss_reference,
)
from flow.path import INPUT_PATHS

DISTILLATION_LOSSES: dict[tuple[str, str], Callable] = {
    ("flm_distill", "dspace"): semigroup_loss,  # stage 1 (§5)
    ("flm_distill", "reference"): semigroup_loss_reference,
    ("flm_distill_second", "dspace"): flow_map_matching_loss,  # stage 2, FMLM (§6)
    ("flm_distill_second", "reference"): flow_map_matching_loss_reference,
}


def distillation_objective(algo: str, input_path: str) -> Callable:
    """Per-token loss function (B, L) of ``algo`` on ``input_path``."""
    if input_path not in INPUT_PATHS:
        raise ValueError(f"training.input_path={input_path!r}; expected one of {INPUT_PATHS}")
    if (algo, input_path) not in DISTILLATION_LOSSES:
        raise ValueError(f"algo={algo!r} has no distillation objective")
    return DISTILLATION_LOSSES[algo, input_path]
