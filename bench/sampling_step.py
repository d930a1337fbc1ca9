"""Sampling speed: FMLM at 1/2/4 steps and one FLM Euler step against one forward pass;
prints one table.

    python bench/sampling_step.py            # GPU: DiT small, L=1024, V=50258
    python bench/sampling_step.py --quick    # CPU smoke run

FMLM: flow.sampling.sample_euler(two_times=True) on a double-time-embedding
backbone, sequences/s at B = 64, 128, 256 (target: >= 1,000 seq/s at 1 step).
FLM Euler step: one step of flow.sampling.sample_euler's math (denoised_projection
with p @ E, then the flow-map update), in ms, against two forward passes (target ratio
<= 1.1): the network on a one-hot-space state z (B, L, V), i.e. z @ E in float32 (TF32
under matmul precision "high") then the bf16 body, which is what the paper's sampler
calls every step; and the body alone from a D-space state, backbone(h, t) -> (B, L, V)
logits. The p @ E product costs as much as the output layer (2·D·V FLOPs per token), so
the FLOP floor of the second ratio is (F + 2·D·V) / F (printed). --euler-chunks times
the step at several position chunks. The backbone runs under bf16 autocast on GPU
(bf16 matmuls, float32 accumulation); the D-space state is float32 or, with
--state-dtype float64, float64. Backbones are random-init (timing only); the
output layer is randomised so that the logits are not all equal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    GPT2_VOCAB,
    backbone,
    device_name,
    forward_flops_per_token,
    gpu_bf16_autocast,
    model_config,
    peak_gib,
    reset_memory,
    timed,
)

from flow.flow_map import flow_map  # noqa: E402
from flow.sampling import denoised_projection, initial_state, sample_euler, step_grid  # noqa: E402
from flow.schedule import AlphaGammaTable  # noqa: E402
from speed.compile import compile_for_sampling  # noqa: E402

EPS = 1e-5
STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    p.add_argument("--model", default=None, help="configs/model/<name>.yaml (small; quick: tiny)")
    p.add_argument("--vocab", type=int, default=None, help="V (50258; quick: 512)")
    p.add_argument("--length", type=int, default=None, help="L (1024; quick: 32)")
    p.add_argument("--batches", default=None, help="FMLM batches (64,128,256; quick: 2,4)")
    p.add_argument("--fmlm-steps", default="1,2,4")
    p.add_argument("--euler-batch", type=int, default=None, help="FLM step batch (64; quick: 2)")
    p.add_argument("--chunks", default="256",
                   help="sampling.position_chunk value(s) of the FMLM rows (a row per value)")
    p.add_argument("--euler-chunks", default=None,
                   help="position chunks of the Euler rows (default: the first of --chunks)")
    p.add_argument("--state-dtype", default="float32,float64",
                   help="D-space state precision(s): float32 and/or float64")
    p.add_argument("--modes", default="eager,compiled",
                   help="eager and/or compiled (torch.compile of the backbone's features)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (5; quick: 1)")
    a = p.parse_args()
    a.vocab = a.vocab or (512 if a.quick else GPT2_VOCAB)
    a.length = a.length or (32 if a.quick else 1024)
    a.batches = [int(b) for b in (a.batches or ("2,4" if a.quick else "64,128,256")).split(",")]
    a.fmlm_steps = [int(s) for s in a.fmlm_steps.split(",")]
    a.euler_batch = a.euler_batch or (2 if a.quick else 64)
    a.repeats = a.repeats or (1 if a.quick else 5)
    a.chunks = [int(c) for c in a.chunks.split(",")]
    a.euler_chunks = [int(c) for c in (a.euler_chunks or str(a.chunks[0])).split(",")]
    a.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a.model_cfg = model_config(a.model or ("tiny" if a.quick else "small"), a.length)
    return a


def make_net(args, double_temb: bool, compiled: bool):
    torch.manual_seed(0)
    net = backbone(args.model_cfg, args.vocab, double_temb, device=args.device).eval()
    with torch.no_grad():
        net.output_layer.linear.weight.normal_(0, 0.02)
    if compiled:  # as sample_eval / generate with sampling.compile=true
        compile_for_sampling(net)
    return net


@torch.no_grad()
def fmlm_run(args, net, table, batch: int, steps: int, state_dtype, chunk: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """One FMLM generation as sample_eval runs it: initial state, then ``steps`` steps."""
    with gpu_bf16_autocast(args.device):
        noise = initial_state(net, batch, args.length, generator, dtype=state_dtype)
        return sample_euler(net, table, noise, steps, EPS, two_times=True,
                            position_chunk=chunk)


@torch.no_grad()
def fmlm_row(args, net, table, batch: int, steps: int, state_dtype, chunk: int) -> dict:
    reset_memory(args.device)
    gen = torch.Generator(device=args.device).manual_seed(0)
    try:
        seconds = timed(lambda: fmlm_run(args, net, table, batch, steps, state_dtype, chunk, gen),
                        args.device, 1, args.repeats)
    except torch.OutOfMemoryError:
        return {"oom": True}
    return {"oom": False, "ms": 1e3 * seconds, "seq_per_s": batch / seconds,
            "peak_gib": peak_gib(args.device)}


def euler_closures(args, net, table, state_dtype, chunk: int):
    """Closures of one FLM Euler step (mid-trajectory, batch euler_batch) and of the two
    forward passes it is compared with: the network body from a D-space state, and the
    network on a one-hot-space state z (B, L, V) as the paper's sampler calls it every step
    (z @ E in float32 outside the bf16 autocast, then the body)."""
    batch = args.euler_batch
    gen = torch.Generator(device=args.device).manual_seed(0)
    h = initial_state(net, batch, args.length, gen, dtype=state_dtype)
    t, gamma = step_grid(table, 4, args.device, dtype=state_dtype)
    t_now = t[1].float().expand(batch)

    @torch.no_grad()
    def euler_step():
        with gpu_bf16_autocast(args.device):
            p_proj, _ = denoised_projection(net, h, t_now, None, chunk)
            return flow_map(h, p_proj.to(h.dtype), None, gamma[1].expand(batch),
                            gamma[2].expand(batch), EPS)

    @torch.no_grad()
    def forward():
        with gpu_bf16_autocast(args.device):
            return net(h.to(net.input_embedding.dtype), t_now)

    state = {}

    @torch.no_grad()
    def forward_state():
        if "z" not in state:  # the (B, L, V) float32 state, made once
            state["z"] = torch.randn(batch, args.length, args.vocab, device=args.device,
                                     generator=gen)
        embedded = net.embed_state(state["z"])  # float32, autocast off
        with gpu_bf16_autocast(args.device):
            return net(embedded, t_now)

    return euler_step, forward, forward_state


def euler_vs_forward(args, net, table, state_dtype, chunk: int) -> dict:
    """ms of one FLM Euler step and of the two forward passes (``euler_closures``)."""
    reset_memory(args.device)
    euler_step, forward, forward_state = euler_closures(args, net, table, state_dtype, chunk)
    out = {"oom": False}
    try:
        out["step_ms"] = 1e3 * timed(euler_step, args.device, 2, args.repeats)
        out["peak_gib"] = peak_gib(args.device)
        reset_memory(args.device)
        out["forward_ms"] = 1e3 * timed(forward, args.device, 2, args.repeats)
        reset_memory(args.device)
        out["state_forward_ms"] = 1e3 * timed(forward_state, args.device, 2, args.repeats)
    except torch.OutOfMemoryError:
        out["oom"] = True
    return out


def main() -> None:
    args = parse_args()
    torch.set_float32_matmul_precision("high")
    table = AlphaGammaTable(args.vocab).to(args.device)
    fmlm_rows, euler_rows = [], []
    for mode in args.modes.split(","):
        compiled = mode == "compiled"
        fmlm = make_net(args, True, compiled)
        for batch in args.batches:
            for chunk in args.chunks:
                for steps in args.fmlm_steps:
                    row = fmlm_row(args, fmlm, table, batch, steps, torch.float32, chunk)
                    fmlm_rows.append({"mode": mode, "batch": batch, "steps": steps,
                                      "chunk": chunk, **row})
                    print(f"# done {mode} FMLM B={batch} chunk={chunk} steps={steps}: "
                          + ("out of memory" if row["oom"] else
                             f"{row['ms']:.1f} ms, peak {row['peak_gib']:.2f} GiB"),
                          file=sys.stderr, flush=True)
        del fmlm
        flm = make_net(args, False, compiled)
        for name in args.state_dtype.split(","):
            for chunk in args.euler_chunks:
                euler_rows.append({"mode": mode, "state": name, "chunk": chunk,
                                   **euler_vs_forward(args, flm, table, STATE_DTYPES[name],
                                                      chunk)})
                print(f"# done {mode} FLM Euler step, state {name}, chunk {chunk}",
                      file=sys.stderr, flush=True)
        del flm
    cfg = args.model_cfg
    f = forward_flops_per_token(cfg, args.vocab)
    floor = (f + 2 * cfg.hidden_size * args.vocab) / f
    print(f"\nSampling, {device_name(args.device)}, torch {torch.__version__}, V={args.vocab}, "
          f"L={args.length}, model={cfg.name} (attn_softcap={cfg.get('attn_softcap', None)}), "
          f"bf16 autocast on GPU\n")
    one_step = {(r["mode"], r["batch"], r["chunk"]): r for r in fmlm_rows
                if r["steps"] == 1 and not r["oom"]}
    print("position_chunk: positions per output-layer chunk of the last step (the product "
          "steps take half, flow.sampling.denoised_projection). vs k x 1 step: this row's "
          "time over k times the 1-step row's (same mode, B and chunk)\n")
    print("| mode | FMLM B | position_chunk | steps | ms | seq/s | peak GiB | vs k x 1 step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in fmlm_rows:
        head = f"| {r['mode']} | {r['batch']} | {r['chunk']} | {r['steps']} | "
        if r["oom"]:
            print(head + "out of memory | | | |")
            continue
        one = one_step.get((r["mode"], r["batch"], r["chunk"]))
        ratio = f"{r['ms'] / (r['steps'] * one['ms']):.3f}" if one else "-"
        print(head + f"{r['ms']:.1f} | {r['seq_per_s']:,.0f} | {r['peak_gib']:.1f} | {ratio} |")
    print(f"\nFLM Euler step vs one forward pass, B={args.euler_batch}. Forward on the state: "
          "the network on a one-hot-space state z (B, L, V), z @ E in float32 then the bf16 "
          "body, as the paper's sampler calls it each step (target: step <= 1.1x it). Body "
          f"forward: from a D-space state, without z @ E (FLOP floor of that ratio "
          f"(F + 2·D·V) / F = {floor:.2f})\n")
    print("| mode | state | chunk | Euler step ms | forward on the state ms | ratio | "
          "body forward ms | ratio | step peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in euler_rows:
        if r["oom"]:
            print(f"| {r['mode']} | {r['state']} | {r['chunk']} | out of memory | | | | | |")
            continue
        print(f"| {r['mode']} | {r['state']} | {r['chunk']} | {r['step_ms']:.1f} | "
              f"{r['state_forward_ms']:.1f} | {r['step_ms'] / r['state_forward_ms']:.2f} | "
              f"{r['forward_ms']:.1f} | {r['step_ms'] / r['forward_ms']:.2f} | "
              f"{r['peak_gib']:.1f} |")

if __name__ == "__main__":
    main()
