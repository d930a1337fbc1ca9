"""MAUVE between generated and reference text on the judge's features.

Features are the judge's last-layer hidden state at the last valid token of each text
(``HFCausalLMJudge.features``), as in the MAUVE paper; the divergence frontier is
computed by the ``mauve-text`` package.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MauveSettings:
    """``num_buckets``: 'auto' (n/10) or an int; the rest are mauve-text's own knobs."""

    num_buckets: int | str = "auto"
    kmeans_num_redo: int = 5
    kmeans_max_iter: int = 500
    kmeans_explained_var: float = 0.9
    scaling_factor: float = 5.0
    seed: int = 25

    @classmethod
    def from_config(cls, eval_cfg: Any, seed: int) -> MauveSettings:
        return cls(
            num_buckets=eval_cfg.get("mauve_num_buckets", "auto"),
            kmeans_num_redo=int(eval_cfg.get("mauve_kmeans_num_redo", 5)),
            kmeans_max_iter=int(eval_cfg.get("mauve_kmeans_max_iter", 500)),
            kmeans_explained_var=float(eval_cfg.get("mauve_kmeans_explained_var", 0.9)),
            scaling_factor=float(eval_cfg.get("mauve_scaling_factor", 5.0)),
            seed=int(seed),
        )


def mauve_from_features(p_features: np.ndarray, q_features: np.ndarray,
                        settings: MauveSettings) -> float:
    """MAUVE of feature sets P (N, D) and Q (M, D); 1 = same distribution."""
    try:
        from mauve import compute_mauve
    except ImportError as error:
        raise ImportError(
            "MAUVE needs the `mauve-text` package (and faiss-cpu, scikit-learn), listed in "
            "requirements.txt: run `pip install -r requirements.txt`, or set "
            "eval.compute_mauve=false") from error
    out = compute_mauve(
        p_features=np.asarray(p_features, dtype=np.float32),
        q_features=np.asarray(q_features, dtype=np.float32),
        num_buckets=settings.num_buckets,
        kmeans_num_redo=settings.kmeans_num_redo,
        kmeans_max_iter=settings.kmeans_max_iter,
        kmeans_explained_var=settings.kmeans_explained_var,
        mauve_scaling_factor=settings.scaling_factor,
        seed=settings.seed,
        verbose=False,
    )
    return float(out.mauve)


def judge_features(judge: Any, token_ids: torch.Tensor, texts: list[str]) -> np.ndarray:
    """(N, D) features from a judge that has a ``features`` method."""
    if not hasattr(judge, "features"):
        raise ValueError(f"judge '{judge.name}' provides no features for MAUVE; "
                         "set eval.compute_mauve=false or use eval.judge=hf")
    return judge.features(token_ids, texts).numpy()
