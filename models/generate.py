"""Conditional generation: prompts and infilling for FLM, stage 1 and FMLM (docs/math.md §9).

``generate`` is the Python entry point on token ids; ``generate_text`` wraps it for a loaded
checkpoint, from a text prompt to texts, through the checkpoint's own tokenizer.
``main.py mode=generate`` uses ``generate`` with the text helpers below (``prompt_known``,
``parse_infill``, ``infill_known``). Known positions
are clamped in the sampler state (flow/sampling.py); this file only turns prompts and infill
templates into ``(known_tokens, known_mask)`` and picks the sampler.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from data.tokenizers import get_tokenizer
from flow.registry import ALGORITHMS
from flow.sampling import (
    DEFAULT_POSITION_CHUNK,
    initial_joint_state,
    initial_state,
    sample_euler,
    sample_flow_map,
)
from flow.schedule import AlphaGammaTable
from runtime.config import ConfigError

log = logging.getLogger(__name__)

DEFAULT_DENOMINATOR_EPS = 1e-5  # docs/math.md §4's δ; the default of sampling.denominator_eps
PLACEHOLDER = re.compile(r"\[MASK:(\d+)\]")  # [MASK:n]: n tokens to fill
# anything that looks like a placeholder ([WORD] or [WORD:...]) but is not a valid [MASK:n]
PLACEHOLDER_LIKE = re.compile(r"\[[A-Z_]+(?::[^\]]*)?\]")


# ---- Python entry point --------------------------------------------------------------
@torch.no_grad()
def generate(backbone, prompt_ids: Sequence[int] | torch.Tensor | None = None,
             known_mask: Sequence[bool] | torch.Tensor | None = None, *, steps: int = 64,
             num_samples: int = 1, generator: torch.Generator | None = None,
             teacher=None, two_times: bool | None = None, length: int | None = None,
             denominator_eps: float = DEFAULT_DENOMINATOR_EPS,
             state_dtype: torch.dtype = torch.float32,
             position_chunk: int = DEFAULT_POSITION_CHUNK,
             sampler: Callable | None = None) -> torch.Tensor:
    """Sample token sequences, optionally conditioned on known tokens: -> (N, L) long.

    * ``backbone``: a DiT (models/dit.py), in eval mode, on the device to sample on.
      FLM: Euler (docs/math.md §4). FMLM (a flow map f(z, t_i, t_{i+1})): the same update
      with two times (§6). Stage 1 (§5): pass the stage-1 student as ``backbone`` and the
      FLM teacher as ``teacher``.
    * ``sampler``: the algorithm's sampler (its entry in flow/registry.py; the Lightning
      modules pass it): ``sampler(teacher, backbone, ...)`` with a teacher, else
      ``sampler(backbone, ...)``; None: ``sample_flow_map`` with a teacher, else ``sample_euler``.
    * ``two_times``: whether ``backbone`` takes (t_i, t_{i+1}); None = ``backbone.double_temb``
      (so an FLM is sampled by Euler and an FMLM by its map). Must not be true with a teacher.
    * ``prompt_ids`` without ``known_mask``: a prefix, (P,) or (B, P) with P <= L; the rest
      of the sequence is generated. With ``known_mask`` (L,) or (B, L) bool: ``prompt_ids``
      has the same shape and gives the tokens at the masked positions (infilling); the
      other entries are ignored. Each of the B rows is sampled ``num_samples`` times:
      N = B * num_samples (rows repeated consecutively); no prompt gives N = num_samples
      unconditional samples.
    * ``generator``: on the backbone's device; ``steps``: sampler steps (FMLM: 1 to a few).

    Known positions of the result equal the given tokens.

    Example (``tok``: the data tokenizer; stage 1: also pass ``teacher=``)::

        from models import generate; from models.load import load_backbone
        backbone, settings = load_backbone("last.ckpt"); backbone = backbone.cuda()
        prompt = [tok.bos_token_id, *tok("The city of", add_special_tokens=False)["input_ids"]]
        tokens = generate(backbone, prompt, steps=128, num_samples=4,
                          generator=torch.Generator("cuda").manual_seed(0))  # (4, L)
    """
    length = int(backbone.length if length is None else length)
    device = backbone.input_embedding.device
    if steps < 1 or num_samples < 1:
        raise ValueError(f"steps={steps} and num_samples={num_samples} must be >= 1")
    if two_times is None:
        two_times = bool(getattr(backbone, "double_temb", False)) and teacher is None
    if two_times and teacher is not None:
        raise ValueError("two_times=True with a teacher: stage 1 samples with the FLM teacher's "
                         "velocity and the student's correction g, not a two-time map")
    known_tokens, mask = known_rows(prompt_ids, known_mask, length)
    batch = num_samples
    if mask is not None:
        known_tokens = known_tokens.to(device).repeat_interleave(num_samples, dim=0)
        mask = mask.to(device).repeat_interleave(num_samples, dim=0)
        batch = mask.shape[0]
    table = AlphaGammaTable(backbone.input_embedding.shape[0])
    if teacher is not None:
        noise = initial_joint_state([teacher, backbone], batch, length, generator,
                                    dtype=state_dtype)
        return (sampler or sample_flow_map)(teacher, backbone, table, noise, steps,
                                            denominator_eps, position_chunk=position_chunk,
                                            known_tokens=known_tokens, known_mask=mask)
    noise = initial_state(backbone, batch, length, generator, dtype=state_dtype)
    return (sampler or sample_euler)(backbone, table, noise, steps, denominator_eps,
                                     two_times=two_times, position_chunk=position_chunk,
                                     known_tokens=known_tokens, known_mask=mask)


# algorithms whose backbone ``generate`` samples: those whose registry sampler is one of the
# flow samplers (FLM and FMLM: Euler, alone; stage 1: the flow-map sampler, with ``teacher=``);
# MDLM and AR sample through their own modules (algo/modules.py)
GENERATE_ALGOS = tuple(name for name, entry in ALGORITHMS.items()
                       if entry.sampler in (sample_euler, sample_flow_map))


def checkpoint_tokenizer(settings):
    """The tokenizer a checkpoint of this project was trained with, from the ``data`` node of
    its saved config (``settings``: what ``models.load.load_backbone`` returned)."""
    config = settings.saved_config
    if config is None or "data" not in config:
        raise ConfigError(
            f"this {settings.source} checkpoint does not record its data: pass tokenizer= (e.g. "
            "transformers.AutoTokenizer.from_pretrained('gpt2') for the paper's OWT models, "
            "'bert-base-uncased' for LM1B)")
    return get_tokenizer(config)


@torch.no_grad()
def generate_text(backbone, settings, prompt: str | None = None, *, steps: int = 64,
                  num_samples: int = 1, generator: torch.Generator | None = None,
                  teacher=None, tokenizer=None, add_bos: bool | str = "auto") -> list[str]:
    """``generate`` from text to text: -> ``num_samples`` decoded samples.

    ``backbone, settings = load_backbone(path)``; ``prompt``: a text the samples continue (None:
    unconditional); ``tokenizer``: default the checkpoint's own (``checkpoint_tokenizer``).
    A stage-1 map needs its FLM teacher (``teacher=``, a backbone); MDLM and AR checkpoints
    sample through ``python -m main mode=generate``.
    """
    if settings.algo is not None and settings.algo not in GENERATE_ALGOS:
        raise ConfigError(f"generate_text samples {', '.join(GENERATE_ALGOS)} checkpoints; this "
                          f"one is algo={settings.algo}: use python -m main mode=generate "
                          "eval.checkpoint_path=<it>")
    if settings.algo == "flm_distill" and teacher is None:
        raise ConfigError("this is a stage-1 flow map (algo=flm_distill): it samples with its "
                          "FLM teacher's velocity, so pass teacher=load_backbone(<FLM "
                          "checkpoint>)[0]")
    tokenizer = checkpoint_tokenizer(settings) if tokenizer is None else tokenizer
    known = mask = None
    if prompt is not None:
        known, mask = prompt_known(tokenizer, prompt, int(backbone.length), add_bos, key="prompt")
    tokens = generate(backbone, known, mask, steps=steps, num_samples=num_samples,
                      generator=generator, teacher=teacher)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in tokens.cpu()]


def known_rows(prompt_ids, known_mask, length: int,
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(prompt_ids, known_mask) as ``generate`` takes them -> tokens (B, L) long, mask (B, L)
    bool, or (None, None) without a prompt."""
    if prompt_ids is None:
        if known_mask is not None:
            raise ValueError("known_mask given without prompt_ids: pass the known tokens too")
        return None, None
    tokens = torch.as_tensor(prompt_ids, dtype=torch.long)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2:
        raise ValueError(f"prompt_ids must be (P,) or (B, P); got shape {tuple(tokens.shape)}")
    if known_mask is None:
        if tokens.shape[1] > length:
            raise ValueError(f"the prompt has {tokens.shape[1]} tokens but the model generates "
                             f"model.length={length}: shorten the prompt")
        mask = torch.zeros(tokens.shape[0], length, dtype=torch.bool)
        mask[:, :tokens.shape[1]] = True
        padded = torch.zeros(tokens.shape[0], length, dtype=torch.long)
        padded[:, :tokens.shape[1]] = tokens
        return padded, mask
    mask = torch.as_tensor(known_mask, dtype=torch.bool)
    if mask.dim() == 1:
        mask = mask[None]
    if mask.shape != tokens.shape or mask.shape[1] != length:
        raise ValueError(f"known_mask {tuple(mask.shape)} and prompt_ids {tuple(tokens.shape)} "
                         f"must have the same shape, (L,) or (B, L) with L = {length}")
    return tokens, mask


# ---- text: prompts and infill templates -----------------------------------------------
def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without automatic special tokens (as the training data)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    if callable(tokenizer):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer.encode(text))  # synthetic.SyntheticTokenizer: no special tokens


def bos_prefix(tokenizer, add_bos: bool | str, key: str = "generate.add_bos") -> list[int]:
    """[BOS] or []: ``add_bos`` true | false | "auto" (when the tokenizer has a BOS token)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos == "auto":
        return [] if bos is None else [int(bos)]
    if add_bos is True:
        if bos is None:
            raise ConfigError(f"{key}=true but the tokenizer has no BOS token: set {key}=false")
        return [int(bos)]
    if add_bos is False:
        return []
    raise ConfigError(f"{key}={add_bos!r}; expected auto, true or false")


def _encode_setting(tokenizer, text: str, key: str) -> list[int]:
    """``encode_text`` of a config value, a ConfigError naming ``key`` for text the tokenizer
    refuses (data=synthetic takes token names such as ``t12``, not words)."""
    try:
        return encode_text(tokenizer, text)
    except ValueError as err:
        raise ConfigError(f"{key}={_short(text)!r}: {err}") from None


def prompt_known(tokenizer, text: str, length: int, add_bos: bool | str = "auto",
                 key: str = "generate.prompt") -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt's tokens as the known prefix: -> tokens (L,), mask (L,). An empty prompt is a
    ConfigError (unconditional samples: leave the key unset)."""
    if not str(text).strip():
        raise ConfigError(f"{key} is empty: give the text to continue, or leave {key} unset "
                          "for unconditional samples")
    ids = bos_prefix(tokenizer, add_bos) + _encode_setting(tokenizer, text, key)
    if len(ids) > length:
        raise ConfigError(f"{key}={_short(text)!r} is {len(ids)} tokens, longer than "
                          f"model.length={length}: shorten it")
    tokens, mask = known_rows(ids, None, length)
    return tokens[0], mask[0]


def parse_infill(text: str, key: str = "generate.infill") -> list[str | int]:
    """An infill template -> its pieces: text (str) and spans to fill (int, tokens).

    ``"The [MASK:3] sat."`` -> ``["The", 3, " sat."]``. Text before a placeholder loses its
    trailing whitespace (the filled span brings its own). Raises ``ConfigError`` for an empty
    template, one without a placeholder, or an unknown placeholder (anything like ``[WORD]``
    or ``[WORD:...]`` other than ``[MASK:n]`` with n >= 1).
    """
    if text is None or not str(text).strip():
        raise ConfigError(f"{key} is empty: give a text with [MASK:n] placeholders, e.g. "
                          f"{key}='The [MASK:8] of the city.'")
    text = str(text)
    for match in PLACEHOLDER_LIKE.finditer(text):
        valid = PLACEHOLDER.fullmatch(match.group(0))
        if valid is None or int(valid.group(1)) < 1:
            raise ConfigError(f"{key} has an unknown placeholder {match.group(0)!r}: the only "
                              "placeholder is [MASK:n], n >= 1 tokens to fill")
    pieces: list[str | int] = []
    position = 0
    for match in PLACEHOLDER.finditer(text):
        before = text[position:match.start()].rstrip()
        if before:
            pieces.append(before)
        pieces.append(int(match.group(1)))
        position = match.end()
    if not any(isinstance(p, int) for p in pieces):
        raise ConfigError(f"{key}={_short(text)!r} has no placeholder: mark the spans to fill "
                          "with [MASK:n] (or use generate.prompt to continue a text)")
    if text[position:]:
        pieces.append(text[position:])
    return pieces


def infill_known(tokenizer, pieces: list[str | int], length: int, add_bos: bool | str = "auto",
                 key: str = "generate.infill") -> tuple[torch.Tensor, torch.Tensor]:
    """Template pieces (``parse_infill``) -> tokens (L,), mask (L,).

    Text pieces are tokenized one by one and known; a span of n is n unknown positions.
    Positions after the template's end are generated too (``infill_template`` says where
    the template ends).
    """
    tokens, mask, _ = infill_template(tokenizer, pieces, length, add_bos, key)
    return tokens, mask


def infill_template(tokenizer, pieces: list[str | int], length: int,
                    add_bos: bool | str = "auto", key: str = "generate.infill",
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``infill_known``'s tokens (L,) and mask (L,), and the template's length: an infill
    is the first that many positions of a sample (the rest of L is free context)."""
    ids = bos_prefix(tokenizer, add_bos)
    known = [True] * len(ids)
    for piece in pieces:
        if isinstance(piece, int):
            ids += [0] * piece
            known += [False] * piece
        else:
            encoded = _encode_setting(tokenizer, piece, key)
            ids += encoded
            known += [True] * len(encoded)
    if len(ids) > length:
        raise ConfigError(f"{key} needs {len(ids)} tokens (text and [MASK:n] spans), more than "
                          f"model.length={length}: shorten it")
    tokens = torch.zeros(length, dtype=torch.long)
    mask = torch.zeros(length, dtype=torch.bool)
    tokens[:len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask[:len(ids)] = torch.tensor(known, dtype=torch.bool)
    return tokens, mask, len(ids)


def check_output_path(path: str | os.PathLike, key: str = "generate.output_path") -> Path:
    """``path`` as a file that can be written (its directory created), checked before any
    sampling: a ConfigError naming ``key`` otherwise."""
    path = Path(str(path))
    if path.is_dir():
        raise ConfigError(f"{key}={path} is a directory: give a file path, e.g. "
                          f"{key}={path / 'generate.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp"):
            pass  # the directory takes a new file
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only")
    except OSError as err:
        raise ConfigError(f"{key}={path} cannot be written ({type(err).__name__}: "
                          f"{err.strerror or err}): give a writable file path") from None
    return path


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
