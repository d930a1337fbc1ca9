"""Tokenizers named by ``data.tokenizer_name_or_path``: a tokenizer.json, a local folder, a copy
saved next to the data cache by ``scripts/prepare_data.py``, or a Hub name."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from data import synthetic
from data.embedded import REPO_ROOT
from data.offline import offline_reason
from runtime.config import ConfigError

log = logging.getLogger(__name__)

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "[BOS]", "[EOS]", "[PAD]"  # the embedded tokenizer's specials


class TokenizerUnavailableError(OSError, ConfigError):
    """The tokenizer is neither local, nor saved next to the data cache, nor on the Hub."""


def _resolve_local(path_or_name: str) -> Path | None:
    """A local path as given (cwd) or relative to the repo root; None if neither exists."""
    for candidate in (Path(path_or_name).expanduser(), REPO_ROOT / path_or_name):
        if candidate.exists():
            return candidate
    return None


def saved_tokenizer_dir(data: DictConfig) -> Path | None:
    """Where ``scripts/prepare_data.py`` saves a Hub tokenizer next to the data cache (None when
    there is no cache directory)."""
    if not data.get("cache_dir"):
        return None
    slug = str(data.tokenizer_name_or_path).replace("/", "__")
    return Path(data.cache_dir).expanduser() / "tokenizers" / slug


def _set_specials(tokenizer: Any) -> Any:
    """BERT-style tokenizers have no BOS/EOS: use [CLS]/[SEP]; add a [PAD] if there is none."""
    if tokenizer.bos_token is None:
        if tokenizer.cls_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a BOS nor a CLS token")
        tokenizer.bos_token = tokenizer.cls_token
    if tokenizer.eos_token is None:
        if tokenizer.sep_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither an EOS nor a SEP token")
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        # gpt2: one extra id, so len(tokenizer) (the model's vocabulary) grows by one
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def _unavailable(name: str, saved: Path | None, err: Exception,
                 offline: str | None = None) -> TokenizerUnavailableError:
    where = f", nor saved at {saved}" if saved is not None else ""
    why = (f"not in the Hugging Face cache, and the Hub was not asked: {offline}" if offline
           else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}")
    return TokenizerUnavailableError(
        f"tokenizer {name!r} (data.tokenizer_name_or_path) is not available: it is not a local "
        f"file or folder{where}, and the Hugging Face Hub could not provide it "
        f"({why}). "
        "Provide it: where the Hub is reachable, run `python scripts/prepare_data.py` with this "
        "run's data= (it saves the tokenizer under <cache_dir>/tokenizers/) and copy that "
        "data.cache_dir here, or point data.tokenizer_name_or_path at a local tokenizer folder "
        "or tokenizer.json; with the tokenizer in the Hugging Face cache (HF_HOME), set "
        "HF_HUB_OFFLINE=1.")


def load_pretrained_tokenizer(data: DictConfig) -> Any:
    """A Hub/local tokenizer with BOS/EOS/PAD set; one clear error when it cannot be found."""
    from transformers import AutoTokenizer  # seconds to import: on use only

    name = str(data.tokenizer_name_or_path)
    local = _resolve_local(name)
    saved = saved_tokenizer_dir(data)
    if local is None and saved is not None and saved.is_dir():
        local = saved
    # an unreachable Hub: the Hugging Face cache only, no retries (data/offline.py)
    offline = offline_reason() if local is None else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local is not None else name,
                                                  **({"local_files_only": True} if offline
                                                     else {}))
    except (OSError, ValueError) as err:
        # `from None`: the Hub client's chained retries say nothing the message does not
        raise _unavailable(name, saved, err, offline) from None
    return _set_specials(tokenizer)


def get_tokenizer(config: DictConfig) -> Any:
    """The tokenizer named by ``config.data`` (a ``PreTrainedTokenizerFast``-like object).

    The model's vocabulary size is ``len(tokenizer)``. ``data.tokenizer_name_or_path`` is a
    ``tokenizer.json`` file, a local tokenizer directory, or a Hub name (looked up first in
    ``<data.cache_dir>/tokenizers/``, where ``scripts/prepare_data.py`` saves it)."""
    data = config.data
    if data.name == "synthetic":
        return synthetic.make_tokenizer(data)
    from transformers import PreTrainedTokenizerFast  # seconds to import: on use only

    local = _resolve_local(str(data.tokenizer_name_or_path))
    if local is not None and local.is_file():
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(local), bos_token=BOS_TOKEN,
                                            eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
        expected = data.get("tokenizer_vocab_size")
        if expected is not None and len(tokenizer) != expected:
            raise ValueError(
                f"{local} has {len(tokenizer)} tokens but data.tokenizer_vocab_size={expected}; "
                "rerun scripts/prepare_embedded_corpus.py (it reads configs/data/embedded.yaml)")
        return tokenizer
    return load_pretrained_tokenizer(data)
