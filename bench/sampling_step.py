"""Euler sampling steps: the paper-style V-space state vs our D-space state; one table.

    python bench/sampling_step.py            # GPU: DiT small, L=1024, V=50258
    python bench/sampling_step.py --quick    # CPU smoke run

paper-style: the state z is (B, L, V) float32, projected by a float32 einsum,
softmax in float32, update in V-space (../shared/perf/anchor-sampling.md).
dspace: flow.sampling.sample_euler, state h = z @ E (B, L, D), logits,
softmax and p @ E one chunk of positions at a time.
Reported: ms per step (median over --repeats runs of --steps steps, after a
warm-up run), sequences/s at 1 and 1024 steps, peak GiB.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flow.sampling import initial_state, sample_euler, step_grid  # noqa: E402
from flow.schedule import AlphaGammaTable  # noqa: E402
from models.dit import DiT  # noqa: E402

EPS = 1e-5
SMALL = dict(hidden_size=768, n_blocks=12, n_heads=12, cond_dim=128)
TINY = dict(hidden_size=64, n_blocks=2, n_heads=4, cond_dim=32)


@torch.no_grad()
def paper_style(model, table, batch, length, steps, device):
    vocab = model.vocab_size
    z = torch.randn(batch, length, vocab, device=device)
    t, gamma = step_grid(table, steps, device, dtype=torch.float32)
    for i in range(steps):
        h = torch.einsum("blv,vd->bld", z, model.input_embedding.float())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(h, t[i].expand(batch))
        p = torch.softmax(logits.float(), dim=-1)
        if i == steps - 1:
            return p.argmax(-1)
        z = z + (gamma[i + 1] - gamma[i]) * (p - z) / (1 - gamma[i] + EPS)


@torch.no_grad()
def dspace(model, table, batch, length, steps, device, chunk):
    noise = initial_state(model, batch, length, None, dtype=torch.float32)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return sample_euler(model, table, noise, steps, EPS, position_chunk=chunk)


def run(args, variant, batch, device):
    sizes = TINY if args.quick else SMALL
    torch.manual_seed(0)
    model = DiT(args.vocab, args.length, dropout=0.0, **sizes).to(device).eval()
    table = AlphaGammaTable(args.vocab).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once():
        if variant == "paper-style":
            return paper_style(model, table, batch, args.length, args.steps, device)
        return dspace(model, table, batch, args.length, args.steps, device, args.chunk)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        once()
        times = []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            once()
            sync()
            times.append((time.perf_counter() - start) / args.steps)
    except torch.OutOfMemoryError:
        return {"variant": variant, "batch": batch, "oom": True}
    finally:
        once = None  # drop the closure (and the model) before freeing the cache
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ms = statistics.median(times) * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"variant": variant, "batch": batch, "oom": False, "ms": ms, "peak": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batches", default=None)
    p.add_argument("--steps", type=int, default=4, help="steps per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=256, help="positions per output chunk")
    args = p.parse_args()
    args.vocab = 512 if args.quick else 50258
    args.length = 64 if args.quick else 1024
    batches = [int(b) for b in (args.batches or ("2,4" if args.quick else "16,64,256")).split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    rows = [run(args, v, b, device) for b in batches for v in ("paper-style", "dspace")]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\nEuler sampling step, {name}, torch {torch.__version__}, V={args.vocab}, "
          f"L={args.length}, {'tiny' if args.quick else 'DiT small'}, eager, "
          f"dspace chunk={args.chunk}\n")
    print("| B | variant | ms/step | seq/s at 1 step | seq/s at 1024 steps | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["oom"]:
            print(f"| {r['batch']} | {r['variant']} | out of memory | | | |")
            continue
        per_seq = r["ms"] / 1e3 / r["batch"]
        print(f"| {r['batch']} | {r['variant']} | {r['ms']:.1f} | {1 / per_seq:,.0f} | "
              f"{1 / (per_seq * 1024):.2f} | {r['peak']:.1f} |")


if __name__ == "__main__":
    main()
