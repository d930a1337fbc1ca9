"""The V-sized matrix products at V = 50,258 (GPT-2 + 1) against V padded to a multiple of 128;
prints one table.

    python bench/vocab_align.py            # GPU: M = 32,768 tokens, D = 768
    python bench/vocab_align.py --quick    # CPU smoke run, tiny sizes

Every product whose one side is the vocabulary: the output layer's logits ``x @ Wᵀ`` (bf16),
its two backward products (``g @ W``, ``gᵀ @ x``), the samplers' ``p @ E`` (float32 state:
TF32 under ``set_float32_matmul_precision('high')``, as main.py sets it, and bf16). cuBLAS
needs 16-byte-aligned leading dimensions for its fastest kernels; 50,258 · 2 bytes is not a
multiple of 16. Median of ``--repeats`` timed runs after warm-up, TFLOP/s, and the padded /
unpadded speed-up measured side by side in one run. Inputs are random (never zeros).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GPT2_VOCAB, device_name, timed  # noqa: E402

ALIGN = 128


def padded(v: int, align: int = ALIGN) -> int:
    return -(-v // align) * align


def products(m: int, d: int, v: int, device: torch.device, bf16: torch.dtype):
    """name -> (closure, FLOPs) for one vocabulary size ``v``."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, dtype=bf16):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    x, w, g = rand(m, d), rand(v, d) * 0.02, rand(m, v)
    p32, e32 = torch.softmax(rand(m, v, dtype=torch.float32), -1), rand(v, d, dtype=torch.float32)
    p16, e16 = p32.to(bf16), e32.to(bf16)
    flops = 2 * m * d * v
    rows = {"logits x @ W^T (bf16)": (lambda: x @ w.T, flops),
            "grad_x g @ W (bf16)": (lambda: g @ w, flops),
            "grad_W g^T @ x (bf16)": (lambda: g.T @ x, flops),
            "p @ E (float32 state, TF32)": (lambda: p32 @ e32, flops),
            "p @ E (bf16)": (lambda: p16 @ e16, flops)}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tokens", type=int, default=None, help="M (32768; quick: 256)")
    p.add_argument("--dim", type=int, default=None, help="D (768; quick: 64)")
    p.add_argument("--vocab", type=int, default=None, help="V (50258; quick: 1001)")
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    m, d = a.tokens or (256 if a.quick else 32768), a.dim or (64 if a.quick else 768)
    v = a.vocab or (1001 if a.quick else GPT2_VOCAB)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    bf16 = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = (v, padded(v))
    results = {}
    for size in sizes:
        for name, (fn, flops) in products(m, d, size, device, bf16).items():
            seconds = timed(fn, device, 3, a.repeats)
            results[(name, size)] = (seconds, flops / seconds)
            print(f"# {name} V={size}: {seconds * 1e3:.3f} ms", file=sys.stderr, flush=True)
    print(f"\nV-sized products, {device_name(device)}, torch {torch.__version__}, M={m} tokens, "
          f"D={d}; V={sizes[0]} against V={sizes[1]} (a multiple of {ALIGN})\n")
    print(f"| product | ms V={sizes[0]} | TFLOP/s | ms V={sizes[1]} | TFLOP/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for name in dict.fromkeys(n for n, _ in results):
        (s0, f0), (s1, f1) = results[(name, sizes[0])], results[(name, sizes[1])]
        print(f"| {name} | {s0 * 1e3:.3f} | {f0 / 1e12:.0f} | {s1 * 1e3:.3f} | {f1 / 1e12:.0f} | "
              f"{s0 / s1:.2f}x |")


if __name__ == "__main__":
    main()
