"""The algorithms as Lightning modules (glue between data, objective, optimiser, EMA and
logging) and the config check that runs before any work."""

from algo.config import resolve_config  # noqa: F401
from algo.modules import (  # noqa: F401
    AR,
    FLM,
    MDLM,
    MODULES,
    FLMDistill,
    FLMDistillSecond,
    FlowLM,
    FlowMapDistillation,
    algorithm_class,
    draw_seed,
)
from flow.registry import ALGORITHMS  # noqa: F401
