"""Speed of the distillation training steps against the FLM step; prints one table
(docs/math.md §5-7).

Rows per mode (eager / compiled): the FLM step (bench/train_step.py's dspace variant,
fused CE), a stage-1 and a stage-2 step (forward, backward, grad clip, AdamW), at
DiT small, L=1024, V=50258, batch 32: tokens/s, MFU, ratio to the FLM step (targets
stage 1 >= 0.4x, stage 2 >= 0.6x), peak memory; and the joint noise draw
eps @ [E_1 | ...] alone (one float32 QR, flow/path.py). Students start from the
teacher's weights (equal embeddings: the singular joint Gram of initialisation).
Teachers are random-init backbones (timing only). bf16 autocast on GPU.

    python bench/distill_step.py            # GPU, paper sizes
    python bench/distill_step.py --quick    # tiny sizes, CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step  # noqa: E402
from common import (  # noqa: E402
    FLOP_FORMULA,
    GPT2_VOCAB,
    H100_BF16_PEAK,
    backbone,
    device_name,
    forward_flops_per_token,
    gpu_bf16_autocast,
    mfu,
    model_config,
    peak_gib,
    reset_memory,
    timed,
)

from flow.flow_map import (  # noqa: E402
    Interval,
    flow_map_matching_loss,
    interval_endpoints,
    semigroup_loss,
)
from flow.path import joint_gaussian_projection  # noqa: E402
from flow.schedule import AlphaGammaTable  # noqa: E402
from models.teacher import initialise_student  # noqa: E402
from runtime.optim import StepHealth, clip_by_global_norm  # noqa: E402
from speed import SpeedOptions  # noqa: E402
from speed.compile import compile_loss, compile_network  # noqa: E402

BOUNDARY_PROB = 64
# forward-pass equivalents per token: stage 1 = 4 no-grad forwards (teacher at s and u,
# student g(s,u), g(u,t)) + the student's g(s,t) forward and backward (3); stage 2 =
# teacher + stage-1 map (2) + the student's forward and backward (3)
STAGE_FORWARDS = {1: 7, 2: 5}
FLM_FORWARDS = 3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model and sizes (CPU smoke run)")
    p.add_argument("--model", default=None, help="configs/model/<name>.yaml (small; quick: tiny)")
    p.add_argument("--length", type=int, default=None, help="sequence length (1024; quick: 16)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (50258; quick: 64)")
    p.add_argument("--batch", type=int, default=None, help="per-device batch (32; quick: 2)")
    p.add_argument("--modes", default="eager,compiled", help="eager and/or compiled")
    p.add_argument("--fused-ce", default="auto", help="training.fused_ce of the FLM row")
    p.add_argument("--steps", type=int, default=None, help="timed iterations (5; quick: 1)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK)
    a = p.parse_args()
    a.length = a.length or (16 if a.quick else 1024)
    a.vocab = a.vocab or (64 if a.quick else GPT2_VOCAB)
    a.batch = a.batch or (2 if a.quick else 32)
    a.steps = a.steps or (1 if a.quick else 5)
    a.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a.model_cfg = model_config(a.model or ("tiny" if a.quick else "small"), a.length)
    return a


def draw_interval(table: AlphaGammaTable, batch: int, device: torch.device) -> Interval:
    d, pos, bnd = torch.rand(3, batch, device=device, dtype=torch.float64)
    s, t = interval_endpoints(d, pos, bnd, BOUNDARY_PROB, add_boundary=True)
    return Interval.from_endpoints(table, s, t)


def networks(args, stage: int, compiled: bool) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    teacher = backbone(args.model_cfg, args.vocab, device=args.device)
    teacher.requires_grad_(False).eval()
    nets = [teacher]
    if stage == 2:
        stage_one = backbone(args.model_cfg, args.vocab, double_temb=True, device=args.device)
        initialise_student(stage_one, teacher, zero_output_layer=False)
        nets.append(stage_one.requires_grad_(False).eval())
    student = backbone(args.model_cfg, args.vocab, double_temb=True, device=args.device)
    initialise_student(student, teacher, zero_output_layer=stage == 1)
    nets.append(student.train())
    if compiled:
        for net in nets:
            compile_network(net)
    return nets


def make_stage_step(args, stage: int, compiled: bool, table: AlphaGammaTable):
    """(step, noise_only): closures running one stage-``stage`` optimizer step, and the joint
    noise draw alone (also used by bench/profile_step.py)."""
    nets = networks(args, stage, compiled)
    student = nets[-1]
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4,
                                  fused=args.device.type == "cuda")
    tokens = torch.randint(0, args.vocab, (args.batch, args.length), device=args.device)
    # compiled whole with its networks, as algo.FlowMapDistillation compiles its objective
    loss_fn = compile_loss(semigroup_loss if stage == 1 else flow_map_matching_loss,
                           SpeedOptions(fused=True, compile=compiled))

    def step() -> None:
        interval = draw_interval(table, args.batch, args.device)
        with gpu_bf16_autocast(args.device):
            noise = joint_gaussian_projection([n.input_embedding for n in nets],
                                              (args.batch, args.length))
            per_token = loss_fn(*nets, tokens, interval, noise)
        per_token.mean().backward()
        StepHealth(grad_scale=clip_by_global_norm(optimizer, 1.0)[1]).hand_to(optimizer)  # as the runs clip
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def noise_only() -> None:
        joint_gaussian_projection([n.input_embedding for n in nets], (args.batch, args.length))

    return step, noise_only


def time_stage(args, stage: int, compiled: bool, table: AlphaGammaTable) -> dict:
    row = {"task": f"stage {stage}", "compiled": compiled, "oom": False}
    reset_memory(args.device)
    step, noise_only = make_stage_step(args, stage, compiled, table)
    try:
        seconds = timed(step, args.device, args.warmup, args.steps)
        row["noise_ms"] = 1e3 * timed(noise_only, args.device, 1, args.steps)
    except torch.OutOfMemoryError:
        row["oom"] = True
        return row
    rate = args.batch * args.length / seconds
    flops = STAGE_FORWARDS[stage] * forward_flops_per_token(args.model_cfg, args.vocab)
    row.update(ms=1e3 * seconds, tokens_per_s=rate, peak_gib=peak_gib(args.device),
               mfu=mfu(rate, flops, args.peak_flops))
    return row


def main() -> None:
    args = parse_args()
    torch.set_float32_matmul_precision("high")
    table = AlphaGammaTable(args.vocab).to(args.device)
    rows = []
    for mode in args.modes.split(","):
        compiled = mode == "compiled"
        flm = train_step.measure(args.model_cfg, args.vocab, "dspace", args.batch, compiled,
                                 args.fused_ce, args.device, args.warmup, args.steps,
                                 args.peak_flops)
        flm["task"] = f"FLM ({flm.get('ce', '?')} CE)"
        rows.append(flm)
        for stage in (1, 2):
            rows.append(time_stage(args, stage, compiled, table))
            print(f"# done {mode} stage {stage}", file=sys.stderr, flush=True)
    cfg = args.model_cfg
    print(f"\nDistillation steps, {device_name(args.device)}, torch {torch.__version__}, "
          f"V={args.vocab}, L={args.length}, B={args.batch}, model={cfg.name} "
          f"(attn_softcap={cfg.get('attn_softcap', None)}), bf16 autocast on GPU")
    print(f"MFU: {FLOP_FORMULA}; stage 1 counts {STAGE_FORWARDS[1]}·F per token, stage 2 "
          f"{STAGE_FORWARDS[2]}·F, FLM {FLM_FORWARDS}·F; F = "
          f"{forward_flops_per_token(cfg, args.vocab) / 1e6:.1f} MFLOP/token; peak "
          f"{args.peak_flops / 1e12:.0f} TFLOP/s\n")
    print("| mode | task | step ms | tokens/s | vs FLM (target) | MFU | joint noise ms | "
          "peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    targets = {"stage 1": 0.4, "stage 2": 0.6}
    flm_rate = {}
    for r in rows:
        mode = "compiled" if r["compiled"] else "eager"
        if r["oom"]:
            print(f"| {mode} | {r['task']} | out of memory | | | | | |")
            continue
        if r["task"].startswith("FLM"):
            flm_rate[mode] = r["tokens_per_s"]
        ratio = ""
        if r["task"] in targets and mode in flm_rate:
            ratio = f"{r['tokens_per_s'] / flm_rate[mode]:.3f} (>= {targets[r['task']]})"
        noise = f"{r['noise_ms']:.1f}" if "noise_ms" in r else ""
        print(f"| {mode} | {r['task']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {ratio} | "
              f"{r['mfu']:.1%} | {noise} | {r['peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
