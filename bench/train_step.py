"""One FLM training step, three input variants side by side; prints one table.

    python bench/train_step.py                       # GPU: DiT small, L=1024, V=50258
    python bench/train_step.py --quick               # CPU smoke run, tiny sizes

Variants on the same backbone (each: forward, backward, grad clip, AdamW):
  tokens     integer tokens through E[x] with cross-entropy: the cost of a
             discrete-diffusion step, the floor an FLM step can approach;
  reference  materialised one-hot + Gaussian noise (B, L, V) in float32 and a
             dense projection (training.input_path=reference);
  dspace     the D-space path of flm-math §3 (training.input_path=dspace);
  paper      the paper's code path as ../shared/perf/anchor-train-step.md
             describes it: float32 one-hot and noise, a float32 einsum, full
             log_softmax then -(one_hot * logp).sum(-1), gamma(t) looked up
             on the host every step. Kept here only as the measured baseline.
Median step time of --steps steps after --warmup; peak memory per variant.
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

from flow.losses import denoiser_cross_entropy  # noqa: E402
from flow.path import noisy_input  # noqa: E402
from flow.schedule import AlphaGammaTable  # noqa: E402
from models.dit import DiT  # noqa: E402

SMALL = dict(hidden_size=768, n_blocks=12, n_heads=12, cond_dim=128)
TINY = dict(hidden_size=64, n_blocks=2, n_heads=4, cond_dim=32)


def make_step(model, table, variant: str, vocab: int, device: torch.device, amp: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")

    def paper_loss(tokens, t):
        gamma = table.gamma_of_alpha(t.cpu()).to(device)[:, None, None]  # host round trip
        onehot = torch.nn.functional.one_hot(tokens, vocab).float()
        with torch.autocast(device.type, enabled=False):
            x_t = (1 - gamma) * torch.randn_like(onehot) + gamma * onehot
            h = torch.einsum("blv,vd->bld", x_t, model.input_embedding.float())
        logp = torch.log_softmax(model(h, t).float(), dim=-1)
        return -(onehot * logp).sum(-1).mean()

    def loss_fn(tokens, t):
        if variant == "paper":
            return paper_loss(tokens, t)
        if variant == "tokens":
            h = model.embed_tokens(tokens)
        else:
            h = noisy_input(model, tokens, table.gamma_of_alpha(t), variant)
        return denoiser_cross_entropy(model(h, t), tokens).mean()

    def step(tokens, t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(tokens, t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def measure(args, variant: str, batch: int, compiled: bool, device: torch.device) -> dict:
    sizes = TINY if args.quick else SMALL
    torch.manual_seed(0)
    model = DiT(args.vocab, args.length, dropout=0.1, **sizes).to(device)
    if compiled:
        model.compile()
    table = AlphaGammaTable(args.vocab)
    if variant != "paper":
        table = table.to(device)
    step = make_step(model, table, variant, args.vocab, device, amp=device.type == "cuda")
    tokens = torch.randint(0, args.vocab, (batch, args.length), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    try:
        for i in range(args.warmup + args.steps):
            t = torch.rand(batch, device=device)
            sync()
            start = time.perf_counter()
            step(tokens, t)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return {"variant": variant, "batch": batch, "compiled": compiled, "oom": True}
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ms = statistics.median(times) * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"variant": variant, "batch": batch, "compiled": compiled, "oom": False, "ms": ms,
            "tokens_per_s": batch * args.length / (ms / 1e3), "peak_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--length", type=int, default=None)
    p.add_argument("--batches", default=None, help="comma-separated per-GPU batch sizes")
    p.add_argument("--modes", default="eager,compiled", help="eager and/or compiled")
    p.add_argument("--compiled-batches", default="32", help="batch sizes also run compiled")
    p.add_argument("--variants", default="tokens,paper,reference,dspace")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    args.vocab = args.vocab or (512 if args.quick else 50258)
    args.length = args.length or (64 if args.quick else 1024)
    batches = [int(b) for b in (args.batches or ("4" if args.quick else "32,64")).split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    modes = args.modes.split(",")
    compiled_batches = {int(b) for b in args.compiled_batches.split(",")}
    rows = []
    for mode in modes:
        for batch in batches:
            if mode == "compiled" and batch not in compiled_batches:
                continue
            for variant in args.variants.split(","):
                row = measure(args, variant, batch, mode == "compiled", device)
                rows.append(row)
                print(f"# done {mode} B={batch} {variant}", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\nFLM train step, {name}, torch {torch.__version__}, V={args.vocab}, "
          f"L={args.length}, {'tiny' if args.quick else 'DiT small'}, bf16 autocast on GPU\n")
    print("| B | mode | variant | step ms | tokens/s | peak GiB | vs tokens (tok/s) | "
          "vs tokens (mem) |")
    print("|---|---|---|---|---|---|---|---|")
    floor = {(r["batch"], r["compiled"]): r for r in rows if r["variant"] == "tokens"}
    for r in rows:
        mode = "compiled" if r["compiled"] else "eager"
        if r["oom"]:
            print(f"| {r['batch']} | {mode} | {r['variant']} | out of memory | | | | |")
            continue
        f = floor.get((r["batch"], r["compiled"]))
        ratio = mem = ""
        if f and not f["oom"]:
            ratio = f"{r['tokens_per_s'] / f['tokens_per_s']:.3f}"
            mem = f"{r['peak_gib'] / f['peak_gib']:.3f}"
        print(f"| {r['batch']} | {mode} | {r['variant']} | {r['ms']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | {ratio} | {mem} |")
    for baseline in ("paper", "reference"):
        ref = {(r["batch"], r["compiled"]): r for r in rows if r["variant"] == baseline}
        for r in rows:
            key = (r["batch"], r["compiled"])
            if r["variant"] == "dspace" and not r["oom"] and key in ref and not ref[key]["oom"]:
                print(f"dspace / {baseline} speed-up (B={key[0]}, "
                      f"{'compiled' if key[1] else 'eager'}): "
                      f"{r['tokens_per_s'] / ref[key]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
