"""The gen-PPL / entropy frontier of a temperature sweep (``eval.temperatures``).

Gen PPL alone rewards low-entropy samples (docs/math.md §8): lowering the softmax
temperature lowers both. Sweeping the temperature traces, per sampling-step count, a curve
of (mean unigram entropy, gen PPL) points; a model is better than another where its curve
lies lower at the same entropy. ``gen_ppl_at_reference_entropy`` reads the curve at one
entropy, that of the reference (held-out real data) row: the gen PPL the model would have
if its samples were as diverse as real text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def frontier_points(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """{str(steps): [{"temperature", "entropy_mean", "gen_ppl"}, ...] sorted by entropy} over
    the rows of one summary (one row per (temperature, steps))."""
    out: dict[str, list[dict[str, float]]] = {}
    for row in rows:
        out.setdefault(str(row["steps"]), []).append(
            {"temperature": row["temperature"], "entropy_mean": row["entropy_mean"],
             "gen_ppl": row["gen_ppl"]})
    for points in out.values():
        points.sort(key=lambda p: (p["entropy_mean"], p["temperature"]))
    return out


def interpolate_at_entropy(points: Sequence[dict[str, float]], entropy: float | None,
                           ) -> dict[str, Any]:
    """Gen PPL at ``entropy``, linear in entropy between the two points that bracket it.

    ``points``: (entropy_mean, gen_ppl) dicts; the bracketing pair is the point with the
    largest entropy <= ``entropy`` and the one with the smallest entropy >= it (a point at
    exactly ``entropy`` gives its own gen PPL). Returns {"value": float | None, "reason":
    None | why there is no value}: no reference entropy, no point with finite values, or
    the entropy outside [lowest, highest] entropy of the points (no extrapolation)."""
    if not _finite(entropy):
        return {"value": None, "reason": "no reference row (eval.reference_row=false)"}
    usable = sorted((float(p["entropy_mean"]), float(p["gen_ppl"])) for p in points
                    if _finite(p["entropy_mean"]) and _finite(p["gen_ppl"]))
    if not usable:
        return {"value": None, "reason": "no row with a finite entropy and gen PPL"}
    low, high = usable[0][0], usable[-1][0]
    if not low <= entropy <= high:
        return {"value": None,
                "reason": f"reference entropy {entropy:.4f} outside the rows' entropy range "
                          f"[{low:.4f}, {high:.4f}]: widen eval.temperatures"}
    below = max((p for p in usable if p[0] <= entropy), key=lambda p: p[0])
    above = min((p for p in usable if p[0] >= entropy), key=lambda p: p[0])
    if above[0] == below[0]:
        return {"value": below[1], "reason": None}
    weight = (entropy - below[0]) / (above[0] - below[0])
    return {"value": below[1] + weight * (above[1] - below[1]), "reason": None}


def frontier_summary(rows: Sequence[dict[str, Any]], reference: dict[str, Any] | None,
                     ) -> tuple[dict[str, list[dict[str, float]]], dict[str, dict[str, Any]]]:
    """(``frontier``, ``gen_ppl_at_reference_entropy``) of summary.json, both keyed by
    str(steps)."""
    frontier = frontier_points(rows)
    entropy = None if reference is None else reference.get("entropy_mean")
    return frontier, {steps: interpolate_at_entropy(points, entropy)
                      for steps, points in frontier.items()}
