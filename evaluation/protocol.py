"""Generative-perplexity protocols: ``eval.protocol=paper | clean`` (docs/math.md §8).

``paper`` reproduces what the paper's code (``david3684/flm``, a DUO/MDLM fork) does:

========================  ==========================================================
decode                    plain ``batch_decode``: special tokens stay as text; a
                          WordPiece (BERT, LM1B) tokenizer's text then gets transformers
                          4.x's ``clean_up_tokenization`` (``paper_cleanup``), whatever
                          transformers is installed (5.x no longer applies it)
re-tokenise               judge tokenizer, pad = EOS, each call padded to its longest
                          text, truncated at ``model.length``, no BOS/EOS added
windows                   one (truncation makes longer impossible)
targets                   positions >= 1; a token counts if it is not EOS or is the
                          first EOS of the row (``judges.paper_target_mask``)
aggregate                 exp(Σ nll / Σ n) over all tokens of all samples, float32
judge                     float32 (``eval.judge_dtype``)
entropy                   per sample over all L ids, special tokens included, nats
sampler                   float32 state, bf16-autocast backbone on CUDA, argmax at
                          the last step
========================  ==========================================================

Two departures that change no number: the judge is loaded once (the paper reloads it
on every call) and no sample is dropped (the paper's judge loop silently drops the
samples beyond a multiple of its batch of 8).

``clean`` is ours: special tokens removed before decoding, the judge adds its BOS/EOS,
whole samples scored in windows of the judge's context, every position from 1 counted,
float64 sums, entropy over the tokens without BOS/EOS/PAD, float32 state, no autocast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from runtime.config import ConfigError

logger = logging.getLogger(__name__)

AUTOCAST_CHOICES = ("auto", "bf16", "none")


@dataclass(frozen=True)
class Protocol:
    """What one gen-PPL protocol decides; see the module docstring."""

    name: str
    keep_special_text: bool  # decode with special tokens as text (else skip them)
    metrics_keep_special: bool  # entropy / distinct-n over all ids (else without BOS/EOS/PAD)
    ppl_dtype: torch.dtype  # precision of the gen-PPL sums
    state_dtype: str  # default sampler-state precision
    autocast: str  # default backbone autocast while sampling: bf16 | none
    wordpiece_cleanup: bool  # WordPiece text gets ``paper_cleanup`` (transformers 4.x's)


PROTOCOLS = {
    "paper": Protocol("paper", keep_special_text=True, metrics_keep_special=True,
                      ppl_dtype=torch.float32, state_dtype="float32", autocast="bf16",
                      wordpiece_cleanup=True),
    "clean": Protocol("clean", keep_special_text=False, metrics_keep_special=False,
                      ppl_dtype=torch.float64, state_dtype="float32", autocast="none",
                      wordpiece_cleanup=False),
}

# transformers 4.x's ``clean_up_tokenization``, which its BERT tokenizers applied to the whole
# decoded text (clean_up_tokenization_spaces=True), in its order: the replacements run one
# after the other, so " ' " -> "'" comes before " n't" -> "n't" ("do n ' t" -> "don't")
PAPER_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                 (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                 (" 're", "'re"))


def paper_cleanup(text: str) -> str:
    """Decoded text as transformers 4.x (the paper's pin) returned it from a BERT tokenizer:
    ``PAPER_CLEANUP`` applied in order (``"duke ' s"`` -> ``"duke's"``)."""
    for spaced, joined in PAPER_CLEANUP:
        text = text.replace(spaced, joined)
    return text


def is_wordpiece(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is backed by a ``tokenizers`` WordPiece model (BERT; LM1B)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "model", None)).__name__ == "WordPiece"


def get_protocol(name: str) -> Protocol:
    """The protocol named by ``eval.protocol``; one ConfigError otherwise."""
    if name not in PROTOCOLS:
        raise ConfigError(f"eval.protocol={name!r} is not a protocol; use one of "
                          f"{sorted(PROTOCOLS)} (paper: the paper's code, clean: ours)")
    return PROTOCOLS[name]


def validate(config: Any) -> Protocol:
    """Check the eval/sampling keys the protocols read, before any work."""
    protocol = get_protocol(config.eval.protocol)
    autocast = config.sampling.autocast
    if autocast not in AUTOCAST_CHOICES:
        raise ConfigError(f"sampling.autocast={autocast!r}; use one of {list(AUTOCAST_CHOICES)} "
                          "(auto: the protocol's default)")
    if protocol.name == "paper" and config.eval.judge == "hf" and not config.eval.retokenize:
        raise ConfigError("eval.retokenize=false with eval.protocol=paper: the paper's code "
                          "always re-tokenises decoded text; set eval.retokenize=true or "
                          "eval.protocol=clean")
    if config.eval.compute_mauve and not config.eval.reference_row:
        raise ConfigError("eval.compute_mauve=true needs eval.reference_row=true (MAUVE is "
                          "taken against held-out text); set one of them")
    return protocol


def sampler_settings(config: Any) -> tuple[str, str]:
    """(state dtype, autocast) for sampling under ``eval.protocol``; departures from the
    protocol's defaults are logged."""
    protocol = validate(config)
    state_dtype = config.sampling.state_dtype
    autocast = config.sampling.autocast
    if autocast == "auto":
        autocast = protocol.autocast
    elif autocast != protocol.autocast:
        logger.warning("sampling.autocast=%s overrides the %s protocol's %s", autocast,
                       protocol.name, protocol.autocast)
    if state_dtype != protocol.state_dtype:
        logger.warning("sampling.state_dtype=%s overrides the %s protocol's %s", state_dtype,
                       protocol.name, protocol.state_dtype)
    return state_dtype, autocast


def autocast_context(autocast: str, device: torch.device) -> Any:
    """Backbone autocast while sampling: bf16 on CUDA; a no-op otherwise (logged on CPU)."""
    if autocast == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if autocast == "bf16":
        logger.warning("sampling.autocast=bf16 applies on CUDA only; sampling on %s runs the "
                       "backbone in its own precision", device.type)
    return torch.autocast(device.type, enabled=False)
