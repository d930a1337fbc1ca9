"""Speed of the distillation stages: one table (flm-math §5-7).

Rows: a stage-1 and a stage-2 training step (forward, backward, AdamW) at DiT small,
L=1024, V=50258 (GPT-2 + [PAD]), per-device batch 16 and 32, as tokens/s and peak
memory; and sampling throughput (sequences/s) of FMLM at 1, 2, 4 steps against FLM
at 1024 Euler steps, batch 64. Teachers are random-init backbones (timing only).

    python bench/distill_step.py            # GPU, paper sizes, bf16 autocast
    python bench/distill_step.py --quick    # tiny sizes, CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flow.flow_map import (  # noqa: E402
    Interval,
    flow_map_matching_loss,
    interval_endpoints,
    semigroup_loss,
)
from flow.path import joint_gaussian_projection  # noqa: E402
from flow.sampling import (  # noqa: E402
    initial_joint_state,
    initial_state,
    sample_euler,
    sample_flow_map,
)
from flow.schedule import AlphaGammaTable  # noqa: E402
from models.dit import DiT  # noqa: E402

SMALL = dict(hidden_size=768, n_blocks=12, n_heads=12, cond_dim=128)  # flm-math §7
TINY = dict(hidden_size=32, n_blocks=2, n_heads=2, cond_dim=32)
GPT2_VOCAB = 50258
BOUNDARY_PROB = 64
DENOMINATOR_EPS = 1e-5


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model and sizes (CPU smoke run)")
    p.add_argument("--length", type=int, default=None, help="sequence length (1024; quick: 16)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (50258; quick: 64)")
    p.add_argument("--train-batches", type=int, nargs="+", default=None,
                   help="per-device training batches (16 32; quick: 2 4)")
    p.add_argument("--sample-batch", type=int, default=None, help="sampling batch (64; quick: 4)")
    p.add_argument("--fmlm-steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--flm-steps", type=int, default=None, help="FLM Euler steps (1024; quick: 8)")
    p.add_argument("--iters", type=int, default=None, help="timed training iterations (5; quick: 2)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="autocast precision (bf16 on GPU, fp32 on CPU)")
    a = p.parse_args()
    quick = a.quick
    a.length = a.length or (16 if quick else 1024)
    a.vocab = a.vocab or (64 if quick else GPT2_VOCAB)
    a.train_batches = a.train_batches or ([2, 4] if quick else [16, 32])
    a.sample_batch = a.sample_batch or (4 if quick else 64)
    a.flm_steps = a.flm_steps or (8 if quick else 1024)
    a.iters = a.iters or (2 if quick else 5)
    a.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a.precision = a.precision or ("bf16" if a.device.type == "cuda" else "fp32")
    a.shape = TINY if quick else SMALL
    return a


def make_dit(args, double_temb: bool) -> DiT:
    return DiT(args.vocab, args.length, dropout=0.1, double_temb=double_temb,
               **args.shape).to(args.device)


def autocast(args):
    if args.precision == "bf16":
        return torch.autocast(device_type=args.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def draw_interval(table: AlphaGammaTable, batch: int, device: torch.device) -> Interval:
    d, pos, bnd = torch.rand(3, batch, device=device, dtype=torch.float64)
    s, t = interval_endpoints(d, pos, bnd, BOUNDARY_PROB, add_boundary=True)
    return Interval.from_endpoints(table, s, t)


def time_training(args, stage: int, batch: int, table: AlphaGammaTable) -> dict:
    teacher = make_dit(args, False).requires_grad_(False).eval()
    map_model = make_dit(args, True).requires_grad_(False).eval() if stage == 2 else None
    student = make_dit(args, True).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4,
                                  fused=args.device.type == "cuda")
    networks = [teacher, student] if stage == 1 else [teacher, map_model, student]
    tokens = torch.randint(0, args.vocab, (batch, args.length), device=args.device)

    def step() -> None:
        interval = draw_interval(table, batch, args.device)
        with autocast(args):
            noise = joint_gaussian_projection([n.input_embedding for n in networks],
                                              (batch, args.length))
            if stage == 1:
                per_token = semigroup_loss(teacher, student, tokens, interval, noise)
            else:
                per_token = flow_map_matching_loss(*networks, tokens, interval, noise)
        per_token.mean().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_memory(args.device)
    step()  # warm-up (kernels, allocator)
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync(args.device)
    seconds = (time.perf_counter() - start) / args.iters
    row = {"task": f"train stage {stage}", "batch": batch, "steps": "-",
           "ms": 1e3 * seconds, "rate": batch * args.length / seconds, "unit": "tokens/s",
           "peak_gib": peak_gib(args.device)}
    return row


@torch.no_grad()
def time_sampling(args, name: str, steps: int, table: AlphaGammaTable, nets: dict) -> dict:
    batch = args.sample_batch
    generator = torch.Generator(device=args.device).manual_seed(0)
    reset_memory(args.device)

    def run() -> torch.Tensor:
        with autocast(args):
            if name == "FLM":
                noise = initial_state(nets["flm"], batch, args.length, generator)
                return sample_euler(nets["flm"], table, noise, steps, DENOMINATOR_EPS)
            if name == "FMLM":
                noise = initial_state(nets["fmlm"], batch, args.length, generator)
                return sample_euler(nets["fmlm"], table, noise, steps, DENOMINATOR_EPS,
                                    two_times=True)
            noise = initial_joint_state([nets["flm"], nets["map"]], batch, args.length, generator)
            return sample_flow_map(nets["flm"], nets["map"], table, noise, steps,
                                   DENOMINATOR_EPS)

    if steps <= 8:
        run()  # warm-up; long runs amortise it
    sync(args.device)
    start = time.perf_counter()
    tokens = run()
    sync(args.device)
    seconds = time.perf_counter() - start
    assert tokens.shape == (batch, args.length)
    return {"task": f"sample {name}", "batch": batch, "steps": steps, "ms": 1e3 * seconds,
            "rate": batch / seconds, "unit": "seq/s", "peak_gib": peak_gib(args.device)}


def main() -> None:
    args = parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    table = AlphaGammaTable(args.vocab).to(args.device)
    rows = []
    for stage in (1, 2):
        for batch in args.train_batches:
            rows.append(time_training(args, stage, batch, table))
    nets = {"flm": make_dit(args, False).eval(), "map": make_dit(args, True).eval(),
            "fmlm": make_dit(args, True).eval()}
    for steps in args.fmlm_steps:
        rows.append(time_sampling(args, "FMLM", steps, table, nets))
    for steps in args.fmlm_steps:
        rows.append(time_sampling(args, "stage-1 map", steps, table, nets))
    rows.append(time_sampling(args, "FLM", args.flm_steps, table, nets))
    name = torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu"
    print(f"# distill_step: {name}, {args.precision}, DiT {args.shape}, L={args.length}, "
          f"V={args.vocab}, timed train iters={args.iters}")
    print(f"| {'task':<20} | {'batch':>5} | {'steps':>5} | {'ms/iter or run':>14} | "
          f"{'throughput':>22} | {'peak GiB':>8} |")
    print(f"|{'-' * 22}|{'-' * 7}|{'-' * 7}|{'-' * 16}|{'-' * 24}|{'-' * 10}|")
    for r in rows:
        rate = f"{r['rate']:,.1f} {r['unit']}"
        print(f"| {r['task']:<20} | {r['batch']:>5} | {r['steps']!s:>5} | {r['ms']:>14.1f} | "
              f"{rate:>22} | {r['peak_gib']:>8.2f} |")


if __name__ == "__main__":
    main()
