"""mode=sample_eval: sweep sampling steps (and softmax temperatures), score samples, write a
table and plots.

Generation and scoring are apart (EDM2's generate / calculate_metrics split):
``samples.json`` holds every sample with its judge NLL, so metrics can be recomputed.

Outputs in ``out_dir``: ``samples.json``, ``summary.json``, ``eval_plot.png`` (and
``frontier_plot.png`` for more than one temperature, ``diagnostics_plot.png`` with
``eval.diagnose``). A row is one (temperature, steps) pair; ``eval.temperatures``
(evaluation/network_wrappers.TemperatureNetwork) adds the gen-PPL / entropy frontier
(evaluation/frontier.py) to ``summary.json``; ``eval.diagnose`` and ``eval.denoiser=hybrid``
are evaluation/diagnostics.py's. The gen-PPL protocol (``eval.protocol``: paper | clean,
``evaluation.protocol``) is recorded in ``summary.json`` and named in the table and the
plot.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

import data
from evaluation import diagnostics, metrics
from evaluation.diversity import REP_NS, self_bleu
from evaluation.frontier import frontier_summary
from evaluation.judges import STAND_IN_LABEL, make_judge
from evaluation.mauve_score import MauveSettings, judge_features, mauve_from_features
from evaluation.network_wrappers import TemperatureNetwork, swapped_prediction_network
from evaluation.plots import plot_diagnostics, plot_frontier, plot_summaries
from evaluation.protocol import (
    autocast_context,
    get_protocol,
    is_wordpiece,
    paper_cleanup,
    sampler_settings,
)
from runtime.config import STATE_DTYPES, ConfigError

logger = logging.getLogger(__name__)

SampleFn = Callable[[int, int, int], torch.Tensor]  # (steps, num_samples, seed) -> (N, L) ids
TemperedSampleFn = Callable[[float], SampleFn]  # softmax temperature -> its SampleFn
DecodeFn = Callable[[torch.Tensor], list[str]]  # (N, L) ids -> N texts
TABLE_COLUMNS = (("temperature", "T", "{:g}"), ("steps", "steps", "{}"),
                 ("gen_ppl", "gen PPL", "{:.2f}"),
                 ("entropy_mean", "entropy", "{:.3f}"), ("distinct_1", "dist-1", "{:.3f}"),
                 ("distinct_2", "dist-2", "{:.3f}"), ("rep_2", "rep-2", "{:.3f}"),
                 ("rep_4", "rep-4", "{:.3f}"), ("self_bleu", "self-BLEU", "{:.3f}"),
                 ("mauve", "MAUVE", "{:.3f}"),
                 ("seconds_per_sample", "s/sample", "{:.4f}"),
                 ("network_calls_per_sample", "NFE/sample", "{}"))


def make_decode_fn(tokenizer: Any, keep_special_text: bool = False,
                   wordpiece_cleanup: bool = False) -> DecodeFn:
    """Decode every sample whole. Clean protocol: special tokens (BOS/EOS/PAD) dropped, the
    judge adds its own BOS/EOS. Paper protocol (``keep_special_text``): plain decoding,
    special tokens stay as text (``<|endoftext|>``, ``[CLS]``, ``[PAD]``, ...).
    ``wordpiece_cleanup`` (paper protocol): a WordPiece tokenizer's text is the tokenizers
    library's decoding followed by transformers 4.x's cleanup (``protocol.paper_cleanup``),
    whatever transformers is installed; other tokenizers (GPT-2 on OWT) decode as before."""
    skip = not keep_special_text
    if wordpiece_cleanup and is_wordpiece(tokenizer):
        def decode(ids: torch.Tensor) -> list[str]:
            texts = tokenizer.batch_decode(ids.tolist(), skip_special_tokens=skip,
                                           clean_up_tokenization_spaces=False)
            return [paper_cleanup(text) for text in texts]
        return decode

    def decode(ids: torch.Tensor) -> list[str]:
        return tokenizer.batch_decode(ids.tolist(), skip_special_tokens=skip)
    return decode


def special_token_ids(tokenizer: Any) -> list[int]:
    """BOS/EOS/PAD ids of a tokenizer (left out of entropy and distinct-n)."""
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return sorted({i for i in ids if i is not None})


def sample_fn_from_module(module: Any, state_dtype: torch.dtype, batch_size: int,
                          device: str | torch.device, autocast: str = "none") -> SampleFn:
    """Wrap ``module.generate`` into a ``SampleFn``: batches of ``batch_size`` drawn in turn
    from one generator seeded with ``seed``, so a fixed (seed, batch_size) is deterministic.
    ``autocast``: bf16 runs the backbone under bf16 autocast on CUDA (the paper's setting);
    the sampler state keeps ``state_dtype``."""
    device = torch.device(device)

    def sample_fn(steps: int, num_samples: int, seed: int) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(seed)
        chunks = []
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            with autocast_context(autocast, device):
                chunks.append(module.generate(num_samples=n, steps=steps, generator=generator,
                                              state_dtype=state_dtype).cpu())
        return torch.cat(chunks)
    return sample_fn


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def score_set(judge: Any, ids: torch.Tensor, texts: list[str], specials: Sequence[int],
              ppl_dtype: torch.dtype = torch.float64,
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Judge + model-free metrics of one sample set -> (row, per-sample records).

    ``specials``: token ids left out of entropy / distinct-n / rep-n / self-BLEU (empty under
    the paper protocol: all L ids count); ``ppl_dtype``: precision of the gen-PPL sums."""
    nll_sum, n_tokens = judge.score(ids, texts)
    stripped = metrics.strip_special(ids, specials)
    per_sample = metrics.sample_metrics(stripped)
    row = {
        "gen_ppl": metrics.generative_perplexity(nll_sum, n_tokens, dtype=ppl_dtype),
        "judge_tokens": int(n_tokens.sum()),
        "entropy_mean": float(np.mean([m["entropy"] for m in per_sample])),
        "distinct_tokens_mean": float(np.mean([m["distinct_tokens"] for m in per_sample])),
    }
    for n in metrics.DISTINCT_NS:
        row[f"distinct_{n}"] = float(np.mean([m[f"distinct_{n}"] for m in per_sample]))
    for n in REP_NS:
        row[f"rep_{n}"] = float(np.mean([m[f"rep_{n}"] for m in per_sample]))
    row["self_bleu"] = self_bleu(stripped)
    if hasattr(judge, "report"):  # judge-specific extras, e.g. the oracle's entropy gap
        row.update(judge.report(ids))
    records = [{"text": t, "token_ids": i, "judge_nll_sum": float(nll), "judge_n_tokens": int(c),
                **m}
               for t, i, nll, c, m in zip(texts, ids.tolist(), nll_sum, n_tokens, per_sample)]
    return row, records


def format_table(rows: Sequence[dict[str, Any]], reference: dict[str, Any] | None,
                 protocol: str | None = None, judge: str | None = None) -> str:
    """Fixed-width table: one line per (temperature, steps) row and a final reference line
    (none when ``reference`` is None); first lines name the gen-PPL protocol and the judge
    when given (a stand-in judge's name says it is one)."""
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        return "-" if value is None else fmt.format(value)
    header = " | ".join(f"{title:>10}" for _, title, _ in TABLE_COLUMNS)
    lines = [header, "-" * len(header)]
    if judge is not None:
        lines.insert(0, f"judge: {judge}")
    if protocol is not None:
        lines.insert(0, f"gen-PPL protocol: {protocol}")
    references = [] if reference is None else [{**reference, "steps": "reference",
                                                "temperature": None}]
    for row in [*rows, *references]:
        lines.append(" | ".join(f"{cell(row, key, fmt):>10}" for key, _, fmt in TABLE_COLUMNS))
    return "\n".join(lines)


def run_sample_eval(
    sample_fn: SampleFn,
    decode_fn: DecodeFn,
    judge: Any,
    reference_texts: list[str] | None,
    reference_ids: torch.Tensor | None,
    steps_list: Sequence[int],
    num_samples: int,
    seed: int,
    out_dir: str,
    model_name: str,
    network_calls_per_step: int,
    special_ids: Sequence[int] = (),
    compute_mauve: bool = True,
    mauve_settings: MauveSettings | None = None,
    mauve_reference_texts: list[str] | None = None,
    mauve_reference_ids: torch.Tensor | None = None,
    warmup: bool = True,
    protocol: str = "clean",
    sampler: dict[str, str] | None = None,
    temperatures: Sequence[float] = (1.0,),
    tempered_sample_fn: TemperedSampleFn | None = None,
    diagnose_fn: diagnostics.DiagnoseFn | None = None,
) -> dict[str, Any]:
    """Sweep ``temperatures`` x ``steps_list``; each row draws ``num_samples`` samples with the
    same ``seed``. Temperature 1 samples with ``sample_fn``, any other T with
    ``tempered_sample_fn(T)`` (required then).

    ``reference_ids`` (N, L) / ``reference_texts``: held-out sequences of the sample length,
    scored the same way (the reference row). MAUVE of every row is taken against
    ``mauve_reference_*`` when given (a second disjoint held-out set; then the reference
    row's MAUVE is the real-vs-real ceiling), else against the reference set (then the
    reference row has no MAUVE). ``reference_*`` None: no reference row and no MAUVE (the
    paper's protocol has neither). ``protocol`` (paper | clean) sets the gen-PPL sums'
    precision and is recorded with ``sampler`` (state dtype, autocast). ``diagnose_fn``
    (evaluation/diagnostics.py, ``eval.diagnose``): called with each step count, its result
    goes to ``summary["diagnostics"][str(steps)]``. Returns the summary dict also written to
    summary.json, with ``frontier`` and ``gen_ppl_at_reference_entropy``
    (evaluation/frontier.py).
    """
    ppl_dtype = get_protocol(protocol).ppl_dtype
    temperatures = [float(T) for T in temperatures]
    if any(T != 1.0 for T in temperatures) and tempered_sample_fn is None:
        raise ValueError("temperatures other than 1 need tempered_sample_fn")
    os.makedirs(out_dir, exist_ok=True)
    mauve_settings = mauve_settings or MauveSettings(seed=seed)
    if compute_mauve and reference_texts is None:
        raise ValueError("MAUVE needs held-out reference text: set eval.reference_row=true "
                         "or eval.compute_mauve=false")
    if mauve_reference_texts is None:
        mauve_reference_texts, mauve_reference_ids = reference_texts, reference_ids
    reference_row, reference_records = None, None
    if reference_texts is not None:
        reference_row, reference_records = score_set(judge, reference_ids, reference_texts,
                                                     special_ids, ppl_dtype)
        reference_row.update(steps=None, seconds_per_sample=None,
                             network_calls_per_sample=None, mauve=None,
                             num_samples=len(reference_texts))
    q_features = None
    if compute_mauve:
        q_features = judge_features(judge, mauve_reference_ids, mauve_reference_texts)
        if mauve_reference_texts is not reference_texts:
            reference_row["mauve"] = mauve_from_features(
                judge_features(judge, reference_ids, reference_texts), q_features,
                mauve_settings)
    if warmup and steps_list:  # CUDA context, kernels, allocator: kept out of the timings
        sample_fn(int(steps_list[0]), 1, seed)
    rows, all_records = [], {}
    for temperature, steps in [(T, int(s)) for T in temperatures for s in steps_list]:
        draw = sample_fn if temperature == 1.0 else tempered_sample_fn(temperature)
        _synchronize()
        start = time.perf_counter()
        ids = draw(steps, num_samples, seed)
        _synchronize()
        elapsed = time.perf_counter() - start
        texts = decode_fn(ids)
        row, records = score_set(judge, ids, texts, special_ids, ppl_dtype)
        row.update(temperature=temperature, steps=steps, seconds_per_sample=elapsed / num_samples,
                   network_calls_per_sample=steps * network_calls_per_step,
                   num_samples=num_samples, mauve=None)
        if compute_mauve:
            row["mauve"] = mauve_from_features(judge_features(judge, ids, texts), q_features,
                                               mauve_settings)
        rows.append(row)
        all_records[records_key(temperature, steps)] = records
        logger.info("T=%g steps=%d gen_ppl=%.3f entropy=%.3f mauve=%s s/sample=%.4g",
                    temperature, steps, row["gen_ppl"], row["entropy_mean"], row["mauve"],
                    row["seconds_per_sample"])
    table = format_table(rows, reference_row, protocol, judge.name)
    logger.info("sample_eval %s (judge %s, protocol %s, seed %d, N=%d)\n%s", model_name,
                judge.name, protocol, seed, num_samples, table)
    frontier, at_reference = frontier_summary(rows, reference_row)
    stand_in = STAND_IN_LABEL in judge.name
    summary = {"model_name": model_name, "judge": judge.name, "judge_stand_in": stand_in,
               "protocol": protocol,
               "sampler": dict(sampler or {}), "seed": seed,
               "num_samples": num_samples, "network_calls_per_step": network_calls_per_step,
               "temperatures": temperatures, "rows": rows, "reference": reference_row,
               "frontier": frontier, "gen_ppl_at_reference_entropy": at_reference,
               "table": table}
    if diagnose_fn is not None:
        summary["diagnostics"] = {str(int(s)): diagnose_fn(int(s)) for s in steps_list}
    with open(os.path.join(out_dir, "samples.json"), "w") as f:
        json.dump({"model_name": model_name, "seed": seed, "judge": judge.name,
                   "judge_stand_in": stand_in, "protocol": protocol,
                   "steps": all_records, "reference": reference_records}, f)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_summaries([summary], os.path.join(out_dir, "eval_plot.png"))
    if len(temperatures) > 1:
        plot_frontier([summary], os.path.join(out_dir, "frontier_plot.png"))
    if diagnose_fn is not None:
        plot_diagnostics(summary, os.path.join(out_dir, "diagnostics_plot.png"))
    logger.info("sample_eval outputs: %s (samples.json, summary.json, eval_plot.png)",
                os.path.abspath(out_dir))
    return summary


def records_key(temperature: float, steps: int) -> str:
    """Key of a row's records in samples.json: str(steps) at temperature 1 (as without a
    temperature sweep), ``"<steps>@T=<T>"`` otherwise."""
    return str(steps) if temperature == 1.0 else f"{steps}@T={temperature:g}"


def check_temperatures(values: Any) -> list[float]:
    """eval.temperatures: a non-empty list of distinct temperatures > 0 (ConfigError)."""
    values = [values] if isinstance(values, (int, float)) else list(values)
    if not values or any(not float(T) > 0 for T in values) or len(set(values)) < len(values):
        raise ConfigError(f"eval.temperatures={values}: give a non-empty list of distinct "
                          "softmax temperatures > 0, e.g. [0.8,0.9,1.0] (1.0: the model as is)")
    return [float(T) for T in values]


def tempered_sample_fn_from_module(module: Any, state_dtype: torch.dtype, batch_size: int,
                                   device: str | torch.device, autocast: str = "none",
                                   ) -> TemperedSampleFn:
    """T -> the ``sample_fn_from_module`` of ``module`` sampling with its prediction network
    at softmax temperature T (``TemperatureNetwork`` in its slot while it samples)."""
    def at(temperature: float) -> SampleFn:
        inner = sample_fn_from_module(module, state_dtype, batch_size, device, autocast)

        def sample_fn(steps: int, num_samples: int, seed: int) -> torch.Tensor:
            with swapped_prediction_network(
                    module, lambda net: TemperatureNetwork(net, temperature)):
                return inner(steps, num_samples, seed)
        return sample_fn
    return at


def held_out_reference_ids(config: Any, tokenizer: Any, num_samples: int,
                           seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, L) validation sequences for the reference row and, when the split has 2N, a
    disjoint (N, L) set for MAUVE; drawn by a permutation seeded with ``seed``."""
    _, valid = data.get_datasets(config, tokenizer)
    if len(valid) < num_samples:
        raise ValueError(f"the validation split of data={config.data.name} has {len(valid)} "
                         f"sequences; sample_eval needs eval.num_samples={num_samples} of them "
                         "for the reference row: lower eval.num_samples")
    order = torch.randperm(len(valid), generator=torch.Generator().manual_seed(seed))
    take = order[:2 * num_samples] if len(valid) >= 2 * num_samples else order[:num_samples]
    ids = torch.stack([torch.as_tensor(valid[int(i)]["input_ids"]) for i in take])
    if len(take) < 2 * num_samples:
        logger.warning("validation split has fewer than 2 x eval.num_samples sequences: MAUVE "
                       "is taken against the reference set and the reference row has none")
        return ids, None
    return ids[:num_samples], ids[num_samples:]


def run_from_config(config: Any, module: Any, tokenizer: Any) -> dict[str, Any]:
    """Entry point of ``main.py mode=sample_eval``.

    ``module``: the loaded model (``generate``, ``network_calls_per_step``), weights chosen by
    the caller (EMA unless eval.disable_ema); ``tokenizer``: the data tokenizer. Samples
    ``sampling.batch_size`` at a time with the state dtype and autocast of
    ``evaluation.protocol.sampler_settings``; the reference row and MAUVE reference are
    held-out validation sequences (``held_out_reference_ids``). Under the paper protocol a
    judge call is one sampling batch (the paper scores each generated batch on its own).
    """
    ev = config.eval
    protocol = get_protocol(ev.protocol)
    temperatures = check_temperatures(ev.temperatures)
    diagnose = diagnostics.setup_from_config(config, module)
    state_dtype, autocast = sampler_settings(config)
    n, seed = int(ev.num_samples), int(ev.seed)
    batch_size = int(config.sampling.batch_size)
    device = next(module.parameters()).device
    decode_fn = make_decode_fn(tokenizer, keep_special_text=protocol.keep_special_text,
                               wordpiece_cleanup=protocol.wordpiece_cleanup)
    judge = make_judge(ev, config.data, data_tokenizer=tokenizer, device=device,
                       max_length=int(config.model.length), call_size=batch_size)
    reference_ids, mauve_ids = None, None
    if ev.reference_row:
        reference_ids, mauve_ids = held_out_reference_ids(config, tokenizer, n, seed)
    sample_fn = sample_fn_from_module(module, STATE_DTYPES[state_dtype], batch_size, device,
                                      autocast=autocast)
    tempered = tempered_sample_fn_from_module(module, STATE_DTYPES[state_dtype], batch_size,
                                              device, autocast=autocast)
    steps_list = config.sampling.steps
    steps_list = [steps_list] if isinstance(steps_list, int) else list(steps_list)
    sampler = {"state_dtype": state_dtype, "autocast": autocast}
    band_label = ""
    if ev.denoiser == diagnostics.HYBRID:
        sampler["denoiser"] = ev.denoiser
        sampler["hybrid_band"] = [float(b) for b in ev.hybrid_band]
        band_label = "-hybrid[{:g},{:g})".format(*sampler["hybrid_band"])
    with diagnostics.hybrid_context(config, module):
        return run_sample_eval(
            sample_fn, decode_fn, judge,
            reference_texts=decode_fn(reference_ids) if reference_ids is not None else None,
            reference_ids=reference_ids,
            steps_list=steps_list, num_samples=n, seed=seed, out_dir=ev.output_dir,
            model_name=f"{config.data.name}-{config.algo.name}{band_label}",
            network_calls_per_step=int(module.network_calls_per_step),
            special_ids=[] if protocol.metrics_keep_special else special_token_ids(tokenizer),
            compute_mauve=bool(ev.compute_mauve),
            mauve_settings=MauveSettings.from_config(ev, seed=seed),
            mauve_reference_texts=decode_fn(mauve_ids) if mauve_ids is not None else None,
            mauve_reference_ids=mauve_ids,
            protocol=protocol.name,
            sampler=sampler,
            temperatures=temperatures, tempered_sample_fn=tempered, diagnose_fn=diagnose,
        )
