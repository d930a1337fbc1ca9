"""Judges: models that score generated text (docs/math.md §8).

A judge turns N samples into a per-sample negative log-likelihood sum and a
per-sample count of scored tokens; generative perplexity over a sample set is
then ``exp(sum nll / sum n_tokens)`` (``evaluation.metrics.generative_perplexity``).

Two gen-PPL protocols (``eval.protocol``, ``evaluation.protocol``) decide which judge
tokens are scored: ``clean`` (ours: whole samples, added BOS/EOS, windows of the judge's
context) and ``paper`` (the paper's code: special tokens kept as text, truncation at
``model.length``, one window, the first-EOS counting rule, float32 sums).

Two judges implement the protocol:

* ``HFCausalLMJudge``: a Hugging Face causal LM (GPT-2 Large by default, or a
  stand-in trained with ``scripts/train_judge.py``), loaded once per evaluation.
* ``OracleJudge`` (``evaluation/oracle.py``): the exact log-probabilities of the
  synthetic source; imported lazily by ``make_judge``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from data.offline import offline_reason
from evaluation import oracle
from runtime.config import ConfigError

logger = logging.getLogger(__name__)

JUDGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRAIN_JUDGE_HINT = (
    "pass a local save_pretrained directory as eval.gen_ppl_eval_model_name_or_path=<dir>, "
    "or train a stand-in judge with `python scripts/train_judge.py --out <dir>`"
)


class JudgeUnavailableError(ConfigError, RuntimeError):
    """The judge is neither local, nor cached, nor fetchable from the Hub (a user's set-up)."""


@runtime_checkable
class Judge(Protocol):
    """Scores samples. ``token_ids`` are the samples in the data tokenizer (N, L_data);
    ``texts`` are the same samples decoded. Returns ``(nll_sum (N,) float, n_tokens (N,) long)``."""

    name: str

    def score(
        self, token_ids: torch.Tensor, texts: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def window_starts(length: int, context: int) -> list[int]:
    """Start positions of the judge windows over a sequence of ``length`` tokens.

    Windows hold ``context`` tokens and advance by ``context - 1``: consecutive windows
    share one token, so every position >= 1 is a prediction target in exactly one window
    (the shared token is the last target of one window and the first context token of
    the next). No state is carried between windows.
    """
    if context < 2:
        raise ValueError(f"judge context length must be >= 2, got {context}")
    stride = context - 1
    return list(range(0, max(length - 1, 1), stride))


def paper_target_mask(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(N, W) bool: the paper protocol's prediction targets of EOS-padded judge rows.

    A position t >= 1 counts if its token is not EOS, or if it is the first EOS of the row
    (position 0 included: a row that starts with EOS has no counted EOS). So text after the
    first EOS counts, later EOS and the EOS padding do not, and a padded row without any
    EOS gets its first pad counted.
    """
    is_eos = ids == eos_token_id
    first_eos = is_eos & (is_eos.long().cumsum(-1) == 1)
    mask = ~is_eos | first_eos
    mask[:, 0] = False
    return mask


def target_mask_after_first_eos(
    ids: torch.Tensor, eos_token_id: int, padding_token_ids: Sequence[int]
) -> torch.Tensor:
    """(N, L) bool: which positions count as prediction targets for ``retokenize=False``.

    Position 0 is context only. A position t >= 1 counts unless it lies after the first
    EOS at a position >= 1 and holds a padding-like token (``padding_token_ids``: EOS, PAD,
    BOS). So the first EOS counts, later padding does not, and text after a mid-sequence
    document boundary (packed data) still counts.
    """
    n, length = ids.shape
    positions = torch.arange(length, device=ids.device).expand(n, length)
    is_eos = (ids == eos_token_id) & (positions >= 1)
    first_eos = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full((n,), length))
    after_first_eos = positions > first_eos[:, None]
    is_padding = torch.zeros_like(ids, dtype=torch.bool)
    for tok in set(padding_token_ids):
        is_padding |= ids == tok
    return (positions >= 1) & ~(after_first_eos & is_padding)


class HFCausalLMJudge:
    """Generative-perplexity judge on a Hugging Face causal LM.

    Token convention (exact), ``protocol="paper"``: each decoded text (special tokens kept
    as text) becomes ``judge_tokenizer(text)`` truncated at ``max_length`` (model.length),
    no BOS/EOS added; each call of ``call_size`` texts is right-padded with EOS to its
    longest row; one window; targets by ``paper_target_mask``; float32 NLL sums.

    ``protocol="clean"`` (ours):

    * ``retokenize=True`` (default): each decoded text becomes judge tokens
      ``[BOS] + judge_tokenizer(text) + [EOS]`` (BOS only if the judge tokenizer has one;
      for GPT-2 both are ``<|endoftext|>``). Every token after the first is a target,
      so ``n_tokens = len(text tokens) + 1`` with BOS (the EOS counts), one fewer without.
    * ``retokenize=False``: ``token_ids`` are used as the judge tokens directly (the data
      and judge vocabularies must be identical; checked at construction). Targets are
      positions >= 1 up to and including the first EOS; after it, EOS/PAD/BOS tokens do
      not count and other tokens do (``target_mask_after_first_eos``).

    Chunking: a sequence longer than the judge's context ``C`` (``n_positions``) is split
    into windows of ``C`` tokens with stride ``C - 1`` (``window_starts``); each window
    is scored independently, so each target is predicted once, from the tokens of its own
    window before it. Windows from all samples are batched ``batch_size`` at a time,
    right-padded; padding is masked out of attention and of the sum. Log-softmax is taken
    in float32 whatever the judge's dtype.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int,
        retokenize: bool = True,
        data_tokenizer: Any | None = None,
        name: str = "hf",
        protocol: str = "clean",
        max_length: int | None = None,
        call_size: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.protocol = protocol
        self.max_length = max_length
        self.call_size = call_size
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.retokenize = retokenize
        self.name = name
        self.context = int(model.config.n_positions if hasattr(model.config, "n_positions")
                           else model.config.max_position_embeddings)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"judge tokenizer of '{name}' has no eos_token; set one in its "
                             "tokenizer_config.json")
        if protocol not in ("clean", "paper"):
            raise ValueError(f"eval.protocol={protocol!r}; use 'paper' or 'clean'")
        if protocol == "paper":
            if not retokenize:
                raise ValueError("eval.protocol=paper always re-tokenises the decoded text; "
                                 "set eval.retokenize=true or use eval.protocol=clean")
            if max_length is None or not 2 <= max_length <= self.context:
                raise ValueError(f"eval.protocol=paper truncates at model.length={max_length}, "
                                 f"which must lie in [2, judge context {self.context}]")
        if not retokenize:
            if data_tokenizer is None:
                raise ValueError("eval.retokenize=false needs the data tokenizer to check that "
                                 "its vocabulary equals the judge's")
            if data_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise ValueError(
                    f"eval.retokenize=false but the data tokenizer's vocabulary "
                    f"({len(data_tokenizer.get_vocab())} entries) differs from the judge "
                    f"'{name}' vocabulary ({len(tokenizer.get_vocab())} entries); "
                    "set eval.retokenize=true")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def judge_sequences(
        self, token_ids: torch.Tensor, texts: list[str]
    ) -> tuple[list[list[int]], list[list[bool]]]:
        """Judge token ids and target masks per sample (see the class docstring).

        Paper protocol: the unpadded, truncated rows; their masks are those of the row
        alone (``score`` pads each call with EOS and recomputes the mask on the padded rows).
        """
        if self.protocol == "paper":
            encoded = self.tokenizer(list(texts), add_special_tokens=False, truncation=True,
                                     max_length=self.max_length)["input_ids"]
            seqs = [list(e) for e in encoded]
            masks = [paper_target_mask(torch.tensor([s]), self.tokenizer.eos_token_id)[0]
                     .tolist() if s else [] for s in seqs]
            return seqs, masks
        if self.retokenize:
            bos = self.tokenizer.bos_token_id
            eos = self.tokenizer.eos_token_id
            encoded = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            seqs = [([bos] if bos is not None else []) + list(e) + [eos] for e in encoded]
            masks = [[i >= 1 for i in range(len(s))] for s in seqs]
            return seqs, masks
        special = [t for t in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                               self.tokenizer.bos_token_id) if t is not None]
        mask = target_mask_after_first_eos(token_ids.cpu(), self.tokenizer.eos_token_id, special)
        return token_ids.cpu().tolist(), mask.tolist()

    @torch.no_grad()
    def score(self, token_ids: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L_data), N texts -> nll_sum (N,), n_tokens (N,) long.

        ``nll_sum`` is float64 under the clean protocol, float32 under the paper one.
        """
        if self.protocol == "paper":
            return self._score_paper(texts)
        seqs, masks = self.judge_sequences(token_ids, texts)
        windows = []  # (sample index, window ids, window target mask)
        for i, (seq, mask) in enumerate(zip(seqs, masks)):
            for s in window_starts(len(seq), self.context):
                windows.append((i, seq[s:s + self.context], mask[s:s + self.context]))
        nll_sum = torch.zeros(len(seqs), dtype=torch.float64)
        n_tokens = torch.zeros(len(seqs), dtype=torch.long)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for b in range(0, len(windows), self.batch_size):
            batch = windows[b:b + self.batch_size]
            width = max(len(w[1]) for w in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            tmask = torch.zeros((len(batch), width), dtype=torch.bool)
            for j, (_, w_ids, w_mask) in enumerate(batch):
                ids[j, :len(w_ids)] = torch.tensor(w_ids)
                attn[j, :len(w_ids)] = 1
                tmask[j, :len(w_ids)] = torch.tensor(w_mask)
            logits = self.model(input_ids=ids.to(self.device),
                                attention_mask=attn.to(self.device)).logits
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None].to(self.device))[..., 0].cpu().double()
            target = tmask[:, 1:] & attn[:, 1:].bool()  # a window's first token is context
            for j, (i, _, _) in enumerate(batch):
                nll_sum[i] += nll[j][target[j]].sum()
                n_tokens[i] += int(target[j].sum())
        return nll_sum, n_tokens

    def paper_rows(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Paper protocol, one call: texts -> EOS-padded judge rows (N, W), attention (N, W),
        target mask (N, W); W = the longest truncated text of the call."""
        seqs, _ = self.judge_sequences(torch.empty(0), texts)
        eos = self.tokenizer.eos_token_id
        width = max(1, max(len(s) for s in seqs))
        ids = torch.full((len(seqs), width), eos, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = torch.tensor(s, dtype=torch.long)
            attn[j, :len(s)] = 1
        return ids, attn, paper_target_mask(ids, eos)

    def _score_paper(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Paper protocol: calls of ``call_size`` texts (the sampling batch), each padded
        with EOS to its longest row, scored in judge batches of ``batch_size``, one window,
        per-token NLLs and sums in float32."""
        n = len(texts)
        call = self.call_size or n
        nll_sum = torch.zeros(n, dtype=torch.float32)
        n_tokens = torch.zeros(n, dtype=torch.long)
        for c in range(0, n, call):
            ids, attn, tmask = self.paper_rows(list(texts[c:c + call]))
            for b in range(0, ids.shape[0], self.batch_size):
                rows = slice(b, b + self.batch_size)
                logits = self.model(input_ids=ids[rows].to(self.device),
                                    attention_mask=attn[rows].to(self.device)).logits
                nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2),
                                      ids[rows, 1:].to(self.device), reduction="none").cpu()
                target = tmask[rows, 1:]
                start = c + b
                # where, not a product: a fully padded row's NLLs need not be finite
                nll_sum[start:start + nll.shape[0]] = torch.where(target, nll, 0.0).sum(-1)
                n_tokens[start:start + nll.shape[0]] = target.sum(-1)
        return nll_sum, n_tokens

    @torch.no_grad()
    def features(self, token_ids: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """MAUVE features (N, D): last-layer hidden state at the last valid judge token of
        the first window (texts longer than the context are truncated, as MAUVE does)."""
        seqs, masks = self.judge_sequences(token_ids, texts)
        if not self.retokenize:  # drop trailing padding: keep up to the last target
            seqs = [s[:max((k for k, m in enumerate(mk) if m), default=0) + 1]
                    for s, mk in zip(seqs, masks)]
        seqs = [s[:self.context] for s in seqs]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = []
        for b in range(0, len(seqs), self.batch_size):
            batch = seqs[b:b + self.batch_size]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for j, s in enumerate(batch):
                ids[j, :len(s)] = torch.tensor(s)
                attn[j, :len(s)] = 1
            hidden = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                output_hidden_states=True).hidden_states[-1]
            last = attn.sum(-1) - 1
            out.append(hidden[torch.arange(len(batch)), last.to(self.device)].float().cpu())
        return torch.cat(out)


STAND_IN_METADATA = "judge_metadata.json"  # scripts/train_judge.py writes it next to the weights
STAND_IN_LABEL = "stand-in judge, not comparable to GPT-2 Large"


def is_stand_in(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is a stand-in judge (its metadata says ``stand_in_judge``)."""
    path = os.path.join(str(name_or_path), STAND_IN_METADATA)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return bool(json.load(f).get("stand_in_judge"))


def _from_pretrained(loader: Any, name_or_path: str, **kwargs: Any) -> Any:
    """Local directory, else the HF cache, else the Hub (unless HF_HUB_OFFLINE); one error."""
    if os.path.isdir(name_or_path):
        return loader.from_pretrained(name_or_path, **kwargs)
    offline = offline_reason()  # an offline variable or an unreachable Hub: no retries
    try:
        return loader.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as error:
        failure = type(error).__name__
    if not offline:
        try:
            return loader.from_pretrained(name_or_path, **kwargs)
        except Exception as error:  # noqa: BLE001 - any Hub failure gets the one message below
            failure = type(error).__name__
    where = f"not asked: {offline}" if offline else f"failed ({failure})"
    raise JudgeUnavailableError(
        f"judge '{name_or_path}' (eval.gen_ppl_eval_model_name_or_path) is not a local "
        f"directory, not in the Hugging Face cache (HF_HOME), and the Hub was {where}. "
        f"Provide it: {TRAIN_JUDGE_HINT}; or download it where the Hub is reachable "
        f"(`huggingface-cli download {name_or_path}`), copy the Hugging Face cache here and set "
        "HF_HUB_OFFLINE=1.")


def load_judge(
    name_or_path: str,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    retokenize: bool = True,
    data_tokenizer: Any | None = None,
    protocol: str = "clean",
    max_length: int | None = None,
    call_size: int | None = None,
) -> HFCausalLMJudge:
    """Load a causal LM judge once, in eval mode, in ``dtype`` (a key of ``JUDGE_DTYPES``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # seconds to import: on use only

    if dtype not in JUDGE_DTYPES:
        raise ValueError(f"eval.judge_dtype={dtype!r}; use one of {sorted(JUDGE_DTYPES)}")
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path)
    model = _from_pretrained(AutoModelForCausalLM, name_or_path)
    model = model.to(device=device, dtype=JUDGE_DTYPES[dtype]).eval()
    logger.info("Loaded judge %s (%s, %s, context %s)", name_or_path, dtype, device,
                getattr(model.config, "n_positions", None))
    if protocol == "paper":  # the paper's judge tokenizer pads with EOS
        tokenizer.pad_token = tokenizer.eos_token
    name = name_or_path
    if is_stand_in(name_or_path):  # the label travels with every number it gives
        name = f"{name_or_path} [{STAND_IN_LABEL}]"
        logger.warning("judge %s is a %s", name_or_path, STAND_IN_LABEL)
    return HFCausalLMJudge(model, tokenizer, batch_size=batch_size, retokenize=retokenize,
                           data_tokenizer=data_tokenizer, name=name, protocol=protocol,
                           max_length=max_length, call_size=call_size)


def make_judge(
    eval_cfg: Any,
    data_cfg: Any = None,
    data_tokenizer: Any | None = None,
    device: str | torch.device = "cpu",
    max_length: int | None = None,
    call_size: int | None = None,
) -> Judge:
    """Build the judge named by ``eval.judge``: ``hf`` (default) or ``oracle``.

    ``max_length`` (model.length) and ``call_size`` (the sampling batch) shape the paper
    protocol's judge rows (``HFCausalLMJudge``)."""
    kind = eval_cfg.get("judge", "hf")
    if kind == "hf":
        return load_judge(
            eval_cfg.gen_ppl_eval_model_name_or_path,
            dtype=eval_cfg.get("judge_dtype", "float32"),
            device=device,
            batch_size=eval_cfg.perplexity_batch_size,
            retokenize=eval_cfg.get("retokenize", True),
            data_tokenizer=data_tokenizer,
            protocol=eval_cfg.get("protocol", "clean"),
            max_length=max_length,
            call_size=call_size,
        )
    if kind == "oracle":
        return oracle.build_oracle_judge(data_cfg)
    raise ValueError(f"eval.judge={kind!r}; use 'hf' (a causal LM) or 'oracle' (synthetic source)")
