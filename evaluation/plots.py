"""Plots from ``summary.json`` files: step sweeps (one line per model and temperature,
reference dashed), the gen-PPL / entropy frontier, the sampling diagnostics vs t."""

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


def _finish(fig: Any, ax: Any, x_label: str, y_label: str, out_path: str) -> None:
    """Label, grid and legend one axes, then write the figure to ``out_path`` and close it."""
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def plot_title(summaries: Sequence[dict[str, Any]]) -> str:
    """The models and the judge(s) that scored them (a stand-in judge's name says so)."""
    models = ", ".join(dict.fromkeys(str(s.get("model_name", "?")) for s in summaries))
    judges = ", ".join(dict.fromkeys(str(s.get("judge", "?")) for s in summaries))
    return f"sample_eval: {models} (judge: {judges})"


def plot_summaries(summaries: Sequence[dict[str, Any]], out_path: str) -> None:
    """Rows: metric vs steps, metric vs wall-clock; columns: gen PPL, entropy, MAUVE; one line
    per (summary, temperature). The step axis has a tick at each step count; the title names
    the models and the judge."""
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
        temperatures = sorted({row.get("temperature", 1.0) for row in summary["rows"]})
        styles = ("-", "--", ":", "-.")
        for r, (x_key, x_label) in enumerate(PLOT_AXES):
            for c, (y_key, y_label) in enumerate(PLOT_METRICS):
                ax = axes[r][c]
                for j, temperature in enumerate(temperatures):  # one line per temperature
                    points = [(row[x_key], row[y_key]) for row in summary["rows"]
                              if row.get("temperature", 1.0) == temperature
                              and _finite(row.get(x_key)) and _finite(row.get(y_key))]
                    if points:
                        xs, ys = zip(*sorted(points))
                        line_label = label if len(temperatures) == 1 else (
                            f"{label} T={temperature:g}")
                        ax.plot(xs, ys, marker="o", color=color,
                                linestyle=styles[j % len(styles)], alpha=1 - 0.5 * j
                                / max(len(temperatures), 1), label=line_label)
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
    _finish(fig, ax, "sampling steps", y_label, out_path)


def plot_frontier(summaries: Sequence[dict[str, Any]], out_path: str) -> None:
    """Gen PPL vs mean entropy (evaluation/frontier.py): one line per (summary, step count)
    through its temperature rows, each point labelled by T; the reference row as a star."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for k, summary in enumerate(summaries):
        name = summary.get("model_name", f"run {k}")
        for steps, points in summary["frontier"].items():
            finite = [p for p in points if _finite(p["entropy_mean"]) and _finite(p["gen_ppl"])]
            if not finite:
                continue
            xs = [p["entropy_mean"] for p in finite]
            ys = [p["gen_ppl"] for p in finite]
            ax.plot(xs, ys, marker="o", label=f"{name}, {steps} steps")
            for p in finite:
                ax.annotate(f"T={p['temperature']:g}", (p["entropy_mean"], p["gen_ppl"]),
                            fontsize="x-small", textcoords="offset points", xytext=(3, 3))
        reference = summary.get("reference") or {}
        if _finite(reference.get("entropy_mean")) and _finite(reference.get("gen_ppl")):
            ax.plot([reference["entropy_mean"]], [reference["gen_ppl"]], marker="*",
                    markersize=12, linestyle="none", color="black",
                    label=f"{name}: reference (real data)")
    ax.set_yscale("log")
    _finish(fig, ax, "mean unigram entropy (nats)", "gen. perplexity", out_path)


def plot_diagnostics(summary: dict[str, Any], out_path: str) -> None:
    """KL(exact || model) per tenth of t (evaluation/diagnostics.py): ``trajectory_kl`` solid
    and ``data_kl`` dashed, one colour per step count, against the bin centres."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (steps, values) in enumerate(summary["diagnostics"].items()):
        color = colors[k % len(colors)]
        for key, style in (("trajectory_kl", "-"), ("data_kl", "--")):
            bins = values[key]
            points = [((j + 0.5) / len(bins), v) for j, v in enumerate(bins) if _finite(v)]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", linestyle=style, color=color,
                        label=f"{steps} steps: {key}")
    ax.set_yscale("log")
    _finish(fig, ax, "model time t (bin centre)", "KL(exact || model), nats / position", out_path)
