"""One FLM training step (forward, backward, grad clip, fused AdamW); prints one table.

    python bench/train_step.py                       # GPU: DiT small, L=1024, V=50258
    python bench/train_step.py --quick               # CPU smoke run, tiny sizes

Variants on the same backbone, both with the same attention (whatever
configs/model/<model>.yaml sets, e.g. model.attn_softcap) and the same fused
output-layer cross-entropy (training.fused_ce, speed/cross_entropy.py):
  tokens  integer tokens through E[x]: a discrete-diffusion step, the floor an
          FLM step can approach;
  dspace  the FLM step as algo.FLM.compute_loss runs it (training.input_path=dspace);
  module  algo.FLM itself outside Lightning (compute_loss with its seeded generator and
          antithetic times, its AdamW, the EMA update): --variants tokens,dspace,module.
Median step time over --steps after --warmup, tokens/s, MFU against --peak-flops,
peak memory. bf16 autocast on GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    FLOP_FORMULA,
    GPT2_VOCAB,
    H100_BF16_PEAK,
    backbone,
    device_name,
    forward_flops_per_token,
    mfu,
    model_config,
    peak_gib,
    reset_memory,
    timed,
)
from settings import inductor_options  # noqa: E402

from flow.losses import denoiser_loss  # noqa: E402
from flow.path import input_noise, noisy_input  # noqa: E402
from flow.schedule import AlphaGammaTable  # noqa: E402
from runtime.optim import StepHealth, clip_by_global_norm  # noqa: E402
from speed.compile import compile_network  # noqa: E402

# how a step clips its gradients (--clips): "kernel" as the runs clip (optim.clip_by_global_norm:
# the factor as the fused AdamW's grad_scale on CUDA), "inplace" torch's clip_grad_norm_ (its
# norms, then a multiply over the gradients)
CLIPS = ("kernel", "inplace")


def clip_gradients(form: str, optimizer: torch.optim.Optimizer, max_norm: float = 1.0) -> None:
    """Clip ``optimizer``'s gradients to ``max_norm`` the ``form`` way (one of CLIPS)."""
    if form == "kernel":
        StepHealth(grad_scale=clip_by_global_norm(optimizer, max_norm)[1]).hand_to(optimizer)
    else:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def make_step(model, table, variant: str, device: torch.device, clip: str = "kernel"):
    """A closure running one optimizer step on (tokens (B, L), t (B,)); returns the loss, and
    the fused CE the model runs (its ``speed.fused_ce``)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    amp = device.type == "cuda"

    def loss_fn(tokens, t):
        if variant == "tokens":
            def h(net):
                return net.embed_tokens(tokens)
        else:
            gamma = table.gamma_of_alpha(t)
            # drawn outside the compiled forward, as algo.FLM draws it
            noise = input_noise(tokens, *model.input_embedding.shape, "dspace")

            def h(net):
                return noisy_input(net, tokens, gamma, "dspace", noise)
        mask = torch.ones_like(tokens)  # the masked mean in one pass, as algo.FLM does
        return denoiser_loss(model, h, t, tokens, mask)

    def step(tokens, t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(tokens, t)
        loss.backward()
        clip_gradients(clip, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, model.speed.fused_ce


def make_module_step(model_cfg, vocab: int, fused_ce: str, compiled: bool,
                     device: torch.device, clip: str = "kernel"):
    """algo.FLM's own step outside Lightning: ``compute_loss`` (seeded noise generator,
    antithetic times, the masked-mean fused CE), AdamW as ``configure_optimizers`` builds it,
    grad clip, the EMA update. Against ``dspace`` it prices the production loss path; against
    ``python -m main`` (bench/end_to_end.py), the loop around it."""
    import algo
    from runtime.config import resolve_config

    config = resolve_config(model_config(model_cfg.name, model_cfg.length, [
        f"training.compile={str(compiled).lower()}", f"training.fused_ce={fused_ce}",
        "checkpointing.save_dir=/tmp/flm-bench", "eval.output_dir=/tmp/flm-bench/eval"],
        full=True))
    module = algo.FLM(config, vocab_size=vocab).to(device)
    module.ema.to(device)
    optimizer = module.configure_optimizers()["optimizer"]
    amp = device.type == "cuda"
    counter = iter(range(10**9))

    def step(tokens, t):
        batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = module.compute_loss(batch, next(counter), 0)
        loss.backward()
        clip_gradients(clip, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.ema.update(module.backbone)
        return loss

    return step, module.backbone.speed.fused_ce


def measure(model_cfg, vocab: int, variant: str, batch: int, compiled: bool, fused_ce: str,
            device: torch.device, warmup: int, steps: int, peak_flops: float,
            burst: int = 1, clip: str = "kernel", inductor: dict | None = None) -> dict:
    """One row: step time, tokens/s, MFU and peak memory of one (variant, B, mode)."""
    row = {"variant": variant, "batch": batch, "compiled": compiled, "oom": False}
    reset_memory(device)
    torch.manual_seed(0)
    model = (backbone(model_cfg, vocab, device=device, fused_ce=fused_ce)
             if variant != "module" else None)
    try:
        if variant == "module":
            step, row["ce"] = make_module_step(model_cfg, vocab, fused_ce, compiled, device,
                                               clip)
        else:
            if compiled:
                compile_network(model, inductor)
            table = AlphaGammaTable(vocab).to(device)
            step, row["ce"] = make_step(model, table, variant, device, clip)
        tokens = torch.randint(0, vocab, (batch, model_cfg.length), device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        # the first step alone: what compiling costs a run at start-up (one timed call)
        row["first_s"] = timed(
            lambda: step(tokens, torch.rand(batch, device=device, generator=gen)), device, 0, 1)
        seconds = timed(lambda: step(tokens, torch.rand(batch, device=device, generator=gen)),
                        device, warmup, steps, burst=burst)
    except torch.OutOfMemoryError:
        row["oom"] = True
        return row
    finally:
        del model
    tokens_per_s = batch * model_cfg.length / seconds
    row.update(ms=seconds * 1e3, tokens_per_s=tokens_per_s, peak_gib=peak_gib(device),
               mfu=mfu(tokens_per_s, 3 * forward_flops_per_token(model_cfg, vocab), peak_flops))
    return row


def listed(p: argparse.ArgumentParser, flag: str, value: str, allowed: tuple[str, ...],
           ) -> list[str]:
    """The comma-separated ``value`` of ``flag`` as a list, each item one of ``allowed``."""
    items = value.split(",")
    for item in items:
        if item not in allowed:
            p.error(f"{flag} {value}: {item!r} is not one of {allowed}")
    return items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    p.add_argument("--model", default=None, help="configs/model/<name>.yaml (small; quick: tiny)")
    p.add_argument("--vocab", type=int, default=None, help="V (50258; quick: 512)")
    p.add_argument("--length", type=int, default=None, help="L (1024; quick: 64)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (32,64; quick: 4)")
    p.add_argument("--modes", default="eager,compiled", help="eager and/or compiled")
    p.add_argument("--variants", default="tokens,dspace")
    p.add_argument("--fused-ce", default="auto",
                   help="training.fused_ce value(s), comma-separated (e.g. auto,none)")
    p.add_argument("--steps", type=int, default=10, help="timed samples (the median is shown)")
    p.add_argument("--burst", default="1",
                   help="comma-separated steps per timed sample, a set of rows each: 1 syncs "
                        "the GPU after every step; a training loop never does, so with more the "
                        "host launches the next step while the GPU runs this one")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK,
                   help="MFU denominator, FLOP/s (H100 SXM dense bf16)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="an inductor option over speed.compile.compile_options() for the "
                        "networks compiled here (repeatable), e.g. "
                        "max_autotune_gemm_backends=ATEN,TRITON (not the module variant)")
    p.add_argument("--clips", default="kernel",
                   help="comma-separated ways to clip the gradients, a set of rows each "
                        f"({', '.join(CLIPS)}; kernel: as the runs clip)")
    args = p.parse_args()
    clips = listed(p, "--clips", args.clips, CLIPS)
    inductor = inductor_options(args.inductor)
    bursts = [int(b) for b in args.burst.split(",")]
    if min(bursts) < 1:
        p.error(f"--burst {args.burst}: steps per timed sample must be >= 1")
    vocab = args.vocab or (512 if args.quick else GPT2_VOCAB)
    length = args.length or (64 if args.quick else 1024)
    model_cfg = model_config(args.model or ("tiny" if args.quick else "small"), length)
    batches = [int(b) for b in (args.batches or ("4" if args.quick else "32,64")).split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    rows = []
    settings = [(fused_ce, mode, batch, variant, burst, clip)
                for fused_ce in args.fused_ce.split(",") for mode in args.modes.split(",")
                for batch in batches for variant in args.variants.split(",")
                for burst in bursts for clip in clips]
    for fused_ce, mode, batch, variant, burst, clip in settings:
        rows.append(measure(model_cfg, vocab, variant, batch, mode == "compiled", fused_ce, device,
                            args.warmup, args.steps, args.peak_flops, burst, clip, inductor))
        rows[-1].update(fused_ce=fused_ce, burst=burst, clip=clip)
        print(f"# done fused_ce={fused_ce} {mode} B={batch} {variant} burst {burst} clip {clip}",
              file=sys.stderr, flush=True)
    print(f"\nFLM train step, {device_name(device)}, torch {torch.__version__}, V={vocab}, "
          f"L={length}, model={model_cfg.name} (D={model_cfg.hidden_size}, "
          f"blocks={model_cfg.n_blocks}, attn_softcap="
          f"{model_cfg.get('attn_softcap', None)}), bf16 autocast on GPU"
          + (f"; inductor options {inductor}" if inductor else ""))
    print("burst: steps per timed sample (1: a GPU sync after every step); clip: how the "
          "gradients are clipped (kernel: the fused AdamW's grad_scale, as the runs clip; "
          "inplace: clip_grad_norm_)")
    print(f"MFU: {FLOP_FORMULA}; F = {forward_flops_per_token(model_cfg, vocab) / 1e6:.1f} "
          f"MFLOP/token; peak {args.peak_flops / 1e12:.0f} TFLOP/s\n")
    print("| B | mode | fused_ce | burst | clip | variant "
          "| first step s | step ms | tokens/s | MFU | peak GiB | vs tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def same_setting(r):
        return (r["fused_ce"], r["batch"], r["compiled"], r["burst"], r["clip"])

    floor = {same_setting(r): r for r in rows if r["variant"] == "tokens"}
    for r in rows:
        mode = "compiled" if r["compiled"] else "eager"
        ce = f"{r['fused_ce']} -> {r.get('ce', '?')}"
        head = (f"| {r['batch']} | {mode} | {ce} | {r['burst']} | {r['clip']} | {r['variant']} | ")
        if r["oom"]:
            print(head + "out of memory | | | | | |")
            continue
        f = floor.get(same_setting(r))
        ratio = f"{r['tokens_per_s'] / f['tokens_per_s']:.3f}" if f and not f["oom"] else ""
        print(head + f"{r['first_s']:.1f} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['mfu']:.1%} | {r['peak_gib']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
