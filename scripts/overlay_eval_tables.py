"""Overlay several sample_eval runs in one plot and print their tables.

    python scripts/overlay_eval_tables.py runA/summary.json runB/summary.json --out overlay.png

Each summary.json is written by ``evaluation.sample_eval.run_sample_eval``; one line per
run (labelled by its model_name, or --labels), reference rows dashed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation.plots import plot_summaries  # noqa: E402 - after the repo-root path insert
from evaluation.sample_eval import format_table  # noqa: E402
from runtime import cli  # noqa: E402 - after the repo-root path insert

logger = logging.getLogger("overlay_eval_tables")


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description="overlay sample_eval summary.json files")
    p.add_argument("summaries", nargs="+", help="summary.json files")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--labels", nargs="*", default=None, help="one label per summary")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.summaries):
        p.error(f"--labels has {len(args.labels)} entries for {len(args.summaries)} summaries")
    summaries = []
    for k, path in enumerate(args.summaries):
        with open(path) as f:
            summary = json.load(f)
        if args.labels:
            summary["model_name"] = args.labels[k]
        summaries.append(summary)
        logger.info("%s (%s, judge %s)\n%s\n", summary["model_name"], path, summary["judge"],
                    format_table(summary["rows"], summary["reference"],
                                 summary.get("protocol")))
    plot_summaries(summaries, args.out)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    with cli.user_errors():  # a user's mistake: one line, exit 2
        main()
