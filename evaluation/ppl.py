"""mode=ppl_eval's report: the validation loss as a perplexity, the checkpoint's step and how
much of the validation split was scored, logged and written as JSON.

What ``exp(val/loss)`` means depends on the algorithm (docs/math.md §8, §11): AR's loss is the
exact next-token NLL, so it is the perplexity; MDLM's is the continuous-time NELBO, so it is an
upper bound on the perplexity; the flow models' is the denoiser's cross-entropy, averaged over
the time draws, which bounds no likelihood (their text quality is sample_eval's gen PPL).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PERPLEXITY_MEANING = {
    "ar": "perplexity (exact next-token NLL)",
    "mdlm": "upper bound on the perplexity (exp of the NELBO)",
}
FLOW_MEANING = ("exp of the denoiser cross-entropy averaged over time draws: not a likelihood "
                "bound (compare flow models by sample_eval's gen PPL)")


def ppl_report(loss: float, *, algo: str, step: int | None, checkpoint_path: str,
               data_name: str, split: str, batches_scored: int, batches_total: int,
               sequences_per_batch: int, length: int) -> dict[str, Any]:
    """The report of one ppl_eval: ``loss`` in nats/token over ``batches_scored`` of the
    split's ``batches_total`` validation batches (of ``sequences_per_batch`` sequences of
    ``length`` tokens, all devices)."""
    fraction = batches_scored / batches_total if batches_total else 0.0
    return {
        "checkpoint_path": checkpoint_path, "checkpoint_step": step, "algo": algo,
        "data": data_name, "split": split, "val_loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "perplexity_meaning": PERPLEXITY_MEANING.get(algo, FLOW_MEANING),
        "batches_scored": batches_scored, "batches_total": batches_total,
        "fraction_scored": fraction,
        "sequences_scored": batches_scored * sequences_per_batch,
        "tokens_scored": batches_scored * sequences_per_batch * length,
    }


def describe(report: dict[str, Any]) -> str:
    """One paragraph for the log: perplexity, step, how much of the split."""
    part = ("all of it" if report["batches_scored"] >= report["batches_total"] else
            f"{report['fraction_scored']:.1%} of it (limited by trainer.limit_val_batches; "
            "trainer.limit_val_batches=1.0 scores all)")
    step = report["checkpoint_step"]
    return (f"ppl_eval of {report['checkpoint_path']} (algo={report['algo']}, step "
            f"{'unknown' if step is None else step}): val/loss {report['val_loss']:.4f} "
            f"nats/token, perplexity {report['perplexity']:.3f} ({report['perplexity_meaning']}); "
            f"scored {report['batches_scored']} of {report['batches_total']} batches "
            f"(~{report['sequences_scored']} sequences, {report['tokens_scored']} tokens) of "
            f"data={report['data']} split {report['split']!r}: {part}")


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path
