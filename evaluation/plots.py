"""Step-sweep plots from ``summary.json`` files (one line per model, reference dashed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the Agg backend

PLOT_METRICS = (("gen_ppl", "gen. perplexity"), ("entropy_mean", "mean unigram entropy (nats)"),
                ("mauve", "MAUVE"))
PLOT_AXES = (("steps", "sampling steps"), ("seconds_per_sample", "wall-clock s / sample"))


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def plot_title(summaries: Sequence[dict[str, Any]]) -> str:
    """The models and the judge(s) that scored them (a stand-in judge's name says so)."""
    models = ", ".join(dict.fromkeys(str(s.get("model_name", "?")) for s in summaries))
    judges = ", ".join(dict.fromkeys(str(s.get("judge", "?")) for s in summaries))
    return f"sample_eval: {models} (judge: {judges})"


def plot_summaries(summaries: Sequence[dict[str, Any]], out_path: str) -> None:
    """Rows: metric vs steps, metric vs wall-clock; columns: gen PPL, entropy, MAUVE. The step
    axis has a tick at each step count; the title names the models and the judge."""
    fig, axes = plt.subplots(len(PLOT_AXES), len(PLOT_METRICS),
                             figsize=(5 * len(PLOT_METRICS), 4 * len(PLOT_AXES)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    step_counts = sorted({int(row["steps"]) for summary in summaries for row in summary["rows"]
                          if _finite(row.get("steps"))})
    for k, summary in enumerate(summaries):
        color = colors[k % len(colors)]
        label = summary.get("model_name", f"run {k}")
        if summary.get("protocol"):
            label = f"{label} ({summary['protocol']} protocol)"
        for r, (x_key, x_label) in enumerate(PLOT_AXES):
            for c, (y_key, y_label) in enumerate(PLOT_METRICS):
                ax = axes[r][c]
                points = [(row[x_key], row[y_key]) for row in summary["rows"]
                          if _finite(row.get(x_key)) and _finite(row.get(y_key))]
                if points:
                    xs, ys = zip(*sorted(points))
                    ax.plot(xs, ys, marker="o", color=color, label=label)
                reference = (summary.get("reference") or {}).get(y_key)
                if _finite(reference):
                    ax.axhline(float(reference), color=color, linestyle="--",
                               label=f"{label}: reference")
                ax.set_xscale("log")
                if x_key == "steps" and step_counts:
                    ax.set_xticks(step_counts, [str(s) for s in step_counts])
                    ax.minorticks_off()
                ax.set_xlabel(x_label)
                ax.set_ylabel(y_label)
                ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(plot_title(summaries))
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def plot_metric_vs_steps(summaries: Sequence[dict[str, Any]], y_key: str, y_label: str,
                         out_path: str, horizontal_lines: dict[str, float] | None = None,
                         ) -> None:
    """One panel: ``y_key`` of each summary's rows vs sampling steps, one line per model
    (labelled by ``model_name``); ``horizontal_lines`` maps a label to a level drawn dashed
    (e.g. the source entropy). Non-finite values are left out of a line and named in its
    label, so an all-inf model still appears in the legend."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    all_steps = [float(row["steps"]) for summary in summaries for row in summary["rows"]
                 if _finite(row.get("steps"))]
    for k, summary in enumerate(summaries):
        label = summary.get("model_name", f"run {k}")
        if summary.get("protocol"):
            label = f"{label} ({summary['protocol']} protocol)"
        rows = [row for row in summary["rows"] if _finite(row.get("steps"))]
        points = sorted((row["steps"], row[y_key]) for row in rows if _finite(row.get(y_key)))
        missing = sorted(row["steps"] for row in rows if not _finite(row.get(y_key)))
        if missing:
            label += f" (not finite at steps {', '.join(str(s) for s in missing)})"
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, ys, marker="o", label=label)
    for k, (label, level) in enumerate((horizontal_lines or {}).items()):
        ax.axhline(float(level), color="black", linestyle=("--", ":", "-.")[k % 3], label=label)
    if all_steps:  # explicit limits: a log axis cannot autoscale when every value is inf
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(all_steps) / 1.5, max(all_steps) * 1.5)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(y_label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
