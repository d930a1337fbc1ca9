"""The algorithms: Lightning modules (glue between data, objective, optimiser, EMA, logging)."""

from algo.modules import (  # noqa: F401
    ALGORITHMS,
    AR,
    FLM,
    MDLM,
    STATE_DTYPES,
    FLMDistill,
    FLMDistillSecond,
    FlowLM,
    FlowMapDistillation,
    algorithm_class,
    draw_seed,
)
