"""The train step's two heaviest components, each way we can run them; prints two tables.

    python bench/components.py            # GPU: B=32, L=1024, DiT small's heads, V=50258
    python bench/components.py --quick    # CPU smoke run, tiny sizes

Attention (B, H=12, L, hd=64, bf16), forward + backward: SDPA without the softcap (what
the math would cost without it; not the paper's function), FlexAttention with the softcap
as the model runs it (speed/attention.py: the approx-tanh score_mod), with the cap but
autotuned block sizes, and without a score_mod. Each sample times a burst of
ATTENTION_BURST back-to-back calls (one sync at each end): a millisecond of GPU work per
call is too little to time one call at a time (the same kernel read 1.82 and 2.06 ms).
Output layer + cross-entropy (B·L rows, D=768, V padded as models/dit.py pads it),
forward + backward to the mean loss: the plain path (materialised float32 logits), our
chunked CE (recompute in backward) and our mean CE (gradients in the forward,
speed/cross_entropy.py mean_linear_cross_entropy, its chunks through the Triton kernel on CUDA). Median ms over --iters, peak memory,
TFLOP/s counted as the products' FLOPs (attention 4·L·hd per query per head forward,
x 3.5 with backward; output layer 2·D·V per row forward, x 3 with backward).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GPT2_VOCAB, device_name, peak_gib, reset_memory, timed  # noqa: E402

from models.dit import PAD_LOGIT, pad_vocab_rows  # noqa: E402
from speed import attention  # noqa: E402
from speed.attention import softcap_score_mod  # noqa: E402
from speed.cross_entropy import (  # noqa: E402
    chunked_linear_cross_entropy,
    chunked_linear_cross_entropy_sum,
    plain_linear_cross_entropy,
)

SOFTCAP = 50.0
ATTENTION_BURST = 10  # calls per timed sample of the attention table


def attention_variants(device):
    from torch.nn.attention.flex_attention import flex_attention

    tuned = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
    flex = torch.compile(flex_attention, dynamic=False)
    yield "sdpa, no softcap (reference)", lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    yield "flex, no score_mod", lambda q, k, v: flex(q, k, v)
    attention.prepare_softcap(SOFTCAP)
    yield "flex, softcap as approx-tanh (the model's)", lambda q, k, v: (
        attention._flex_attention()(q, k, v, score_mod=softcap_score_mod(SOFTCAP)))
    yield "flex, softcap as approx-tanh, max-autotune", lambda q, k, v: tuned(
        q, k, v, score_mod=softcap_score_mod(SOFTCAP))


def attention_table(args) -> None:
    b, h, length, hd = args.batch, 12 if not args.quick else 2, args.length, 64
    flops = 3.5 * 4 * length * hd * length * h * b
    print("\n| attention, fwd + bwd | ms | TFLOP/s | peak GiB |")
    print("|---|---|---|---|")
    for name, fn in attention_variants(args.device):
        try:
            seconds = _time_attention(fn, args, b, h, length, hd)
        except Exception as error:  # a variant that does not run here is reported, not fatal
            print(f"| {name} | failed: {type(error).__name__}: {str(error)[:80]} | | |")
            traceback.print_exc(file=sys.stderr)
            continue
        print(f"| {name} | {1e3 * seconds:.2f} | {flops / seconds / 1e12:.0f} | "
              f"{peak_gib(args.device):.1f} |", flush=True)


def _time_attention(fn, args, b: int, h: int, length: int, hd: int) -> float:
    reset_memory(args.device)
    q, k, v = (torch.randn(b, h, length, hd, device=args.device, dtype=args.dtype,
                           requires_grad=True) for _ in range(3))

    def run():
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))

    return timed(run, args.device, 3, args.iters, burst=ATTENTION_BURST)


def ce_variants(device):
    fused = device.type == "cuda"
    yield "plain (float32 logits)", lambda h, w, b, x, m: (
        plain_linear_cross_entropy(h, w, b, x, m / m.sum()))
    yield "ours, chunked per token", lambda h, w, b, x, m: (
        chunked_linear_cross_entropy(h, w, b, x) * m).sum() / m.sum()
    yield "ours, mean (grads in forward)", lambda h, w, b, x, m: (
        chunked_linear_cross_entropy_sum(h, w, b, x, m / m.sum(), fused))


def ce_table(args) -> None:
    rows, d, vocab = args.batch * args.length, 768 if not args.quick else 32, args.vocab
    flops = 3 * 2 * rows * d * vocab
    print("\n| output layer + CE, fwd + bwd | ms | TFLOP/s | peak GiB | loss - plain |")
    print("|---|---|---|---|---|")
    reference = None
    for name, fn in ce_variants(args.device):
        try:
            seconds, loss = _time_ce(fn, args, rows, d, vocab)
        except Exception as error:
            print(f"| {name} | failed: {type(error).__name__}: {str(error)[:80]} | | | |")
            traceback.print_exc(file=sys.stderr)
            continue
        reference = loss if reference is None else reference
        print(f"| {name} | {1e3 * seconds:.2f} | {flops / seconds / 1e12:.0f} | "
              f"{peak_gib(args.device):.1f} | {loss - reference:+.2e} |", flush=True)


def _time_ce(fn, args, rows: int, d: int, vocab: int) -> tuple[float, float]:
    """(median seconds of forward + backward, the last loss)."""
    reset_memory(args.device)
    torch.manual_seed(0)
    hidden = torch.randn(1, rows, d, device=args.device, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, d, device=args.device) * 0.02)
    bias = torch.nn.Parameter(torch.zeros(vocab, device=args.device))
    tokens = torch.randint(0, vocab, (1, rows), device=args.device)
    mask = torch.ones_like(tokens)
    losses = []

    def run():
        with torch.autocast(args.device.type, dtype=args.dtype,
                            enabled=args.device.type == "cuda"):
            loss = fn(hidden, pad_vocab_rows(weight), pad_vocab_rows(bias, PAD_LOGIT), tokens,
                      mask)
        loss.backward()
        losses.append(loss.detach())

    seconds = timed(run, args.device, 3, args.iters)
    return seconds, losses[-1].item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=None, help="32 (quick: 2)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--only", default="attention,ce", help="comma-separated tables: attention, ce")
    args = p.parse_args()
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.batch = args.batch or (2 if args.quick else 32)
    args.length = 64 if args.quick else 1024
    args.vocab = 500 if args.quick else GPT2_VOCAB
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    torch.set_float32_matmul_precision("high")
    print(f"Components, {device_name(args.device)}, torch {torch.__version__}, B={args.batch}, "
          f"L={args.length}, V={args.vocab}")
    if "attention" in args.only and args.device.type == "cuda":
        attention_table(args)
    if "ce" in args.only:
        ce_table(args)


if __name__ == "__main__":
    main()
