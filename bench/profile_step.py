"""Where a step's GPU time goes: torch.profiler over a few steps; prints two tables.

    python bench/profile_step.py --task train          # FLM step, DiT small, B=32, compiled
    python bench/profile_step.py --task stage1|stage2  # distillation steps
    python bench/profile_step.py --task fmlm           # one-step FMLM sampling, B=256
    python bench/profile_step.py --task euler          # one FLM Euler step, B=64
    python bench/profile_step.py --quick --task train  # CPU smoke run

Table 1: kernels by GPU time per step (top --top), share of the summed kernel time.
Table 2: the same time by category (matrix products, attention, fused Triton kernels,
cross-entropy, optimizer, copies, other), and the wall time per step next to the summed
kernel time: a wall time well above the kernel time means the GPU waits for the host.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import distill_step  # noqa: E402
import sampling_step  # noqa: E402
import train_step  # noqa: E402
from common import GPT2_VOCAB, backbone, device_name, model_config, sync  # noqa: E402

from flow.schedule import AlphaGammaTable  # noqa: E402
from speed.compile import compile_network  # noqa: E402

CATEGORIES = [  # first match wins
    ("attention (flex / sdpa)", r"flex|attention|fmha|flash"),
    ("cross-entropy", r"_rows_kernel|cross_entropy|_ce_|chunk_loss"),
    ("optimizer (AdamW, grad norm)", r"adam|multi_tensor|foreach|norm_kernel|clip"),
    ("matrix products", r"gemm|nvjet|cutlass|sm90|xmma|cublas|splitk|dot_kernel"),
    ("fused Triton (inductor)", r"^triton_|triton"),
    ("copies / casts / fills", r"copy|memcpy|memset|fill|cat|to_copy|vectorized_elementwise"),
]


def category(name: str) -> str:
    lowered = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return label
    return "other"


def build(args):
    """The closure one step of ``args.task`` runs."""
    device = args.device
    if args.task == "train":
        model = backbone(args.model_cfg, args.vocab, device=device, fused_ce=args.fused_ce)
        if not args.eager:
            compile_network(model)
        table = AlphaGammaTable(args.vocab).to(device)
        step, _ = train_step.make_step(model, table, "dspace", device)
        tokens = torch.randint(0, args.vocab, (args.batch, args.length), device=device)
        return lambda: step(tokens, torch.rand(args.batch, device=device))
    if args.task in ("stage1", "stage2"):
        table = AlphaGammaTable(args.vocab).to(device)
        step, _ = distill_step.make_stage_step(args, int(args.task[-1]), not args.eager, table)
        return step
    if args.task == "fmlm":
        args.chunk, args.repeats = args.position_chunk, 1
        net = sampling_step.make_net(args, double_temb=True, compiled=not args.eager)
        table = AlphaGammaTable(args.vocab).to(device)
        return lambda: sampling_step.fmlm_run(args, net, table, args.batch, 1, torch.float32)
    if args.task == "euler":
        args.euler_batch, args.repeats = args.batch, 1
        net = sampling_step.make_net(args, double_temb=False, compiled=not args.eager)
        table = AlphaGammaTable(args.vocab).to(device)
        step, _, _ = sampling_step.euler_closures(args, net, table, torch.float32,
                                                  args.position_chunk)
        return step
    raise SystemExit(f"unknown --task {args.task}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="train", help="train | stage1 | stage2 | fmlm | euler")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    p.add_argument("--batch", type=int, default=None, help="32 (fmlm: 256; euler: 64; quick: 2)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--eager", action="store_true", help="no torch.compile")
    p.add_argument("--fused-ce", default="auto")
    p.add_argument("--position-chunk", type=int, default=256)
    args = p.parse_args()
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.length = 16 if args.quick else 1024
    args.vocab = 64 if args.quick else GPT2_VOCAB
    args.batch = args.batch or (2 if args.quick else 256 if args.task == "fmlm"
                                                else 64 if args.task == "euler" else 32)
    args.model_cfg = model_config("tiny" if args.quick else "small", args.length)
    torch.set_float32_matmul_precision("high")
    fn = build(args)
    for _ in range(args.warmup):
        fn()
    sync(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if args.device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            fn()
        sync(args.device)
    wall_ms = 1e3 * (time.perf_counter() - start) / args.steps
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if args.device.type == "cuda" and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if args.device.type != "cuda" and event.cpu_parent is not None:
            continue  # CPU run: top-level ops only
        kernels[event.name][0] += event.device_time if args.device.type == "cuda" \
            else event.cpu_time
        kernels[event.name][1] += 1
    total = sum(v[0] for v in kernels.values()) / 1e3 / args.steps
    print(f"\nProfile of one {args.task} step, {device_name(args.device)}, torch "
          f"{torch.__version__}, B={args.batch}, L={args.length}, V={args.vocab}, "
          f"{'eager' if args.eager else 'compiled'}, {args.steps} steps profiled\n")
    print("| kernel | ms / step | calls / step | share |")
    print("|---|---|---|---|")
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    for name, (us, calls) in ranked[:args.top]:
        ms = us / 1e3 / args.steps
        short = name if len(name) <= 90 else name[:87] + "..."
        print(f"| `{short}` | {ms:.2f} | {calls / args.steps:.0f} | {ms / total:.1%} |")
    by_cat: dict[str, float] = defaultdict(float)
    for name, (us, _) in kernels.items():
        by_cat[category(name)] += us / 1e3 / args.steps
    print("\n| category | ms / step | share |")
    print("|---|---|---|")
    for label, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {ms:.2f} | {ms / total:.1%} |")
    print(f"| **summed kernel time** | {total:.2f} | |")
    print(f"| **wall time per step (profiler on)** | {wall_ms:.2f} | |")


if __name__ == "__main__":
    main()
