"""One FLM training step (forward, backward, grad clip, fused AdamW); prints one table.

    python bench/train_step.py                       # GPU: DiT small, L=1024, V=50258
    python bench/train_step.py --quick               # CPU smoke run, tiny sizes

Variants on the same backbone, both with the same attention (whatever
configs/model/<model>.yaml sets, e.g. model.attn_softcap) and the same fused
output-layer cross-entropy (training.fused_ce, flow/losses.py):
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

import flow.losses  # noqa: E402
import models.dit  # noqa: E402
from flow.losses import fused_mean_cross_entropy, resolve_fused_ce  # noqa: E402
from flow.path import input_noise, noisy_input  # noqa: E402
from flow.schedule import AlphaGammaTable  # noqa: E402
from models.parallelize import compile_network  # noqa: E402
from runtime.optim import StepHealth, clip_by_global_norm  # noqa: E402

# how a step clips its gradients (--clips): "kernel" as the runs clip (optim.clip_by_global_norm:
# the factor as the fused AdamW's grad_scale on CUDA), "inplace" torch's clip_grad_norm_ (its
# norms, then a multiply over the gradients; the runs' way before round 13)
CLIPS = ("kernel", "inplace")


def clip_gradients(form: str, optimizer: torch.optim.Optimizer, max_norm: float = 1.0) -> None:
    """Clip ``optimizer``'s gradients to ``max_norm`` the ``form`` way (one of CLIPS)."""
    if form == "kernel":
        StepHealth(grad_scale=clip_by_global_norm(optimizer, max_norm)[1]).hand_to(optimizer)
    else:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def make_step(model, table, variant: str, fused_ce: str, device: torch.device,
              clip: str = "kernel"):
    """A closure running one optimizer step on (tokens (B, L), t (B,)); returns the loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    backend = resolve_fused_ce(fused_ce, device, per_token_weights=False)
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
        return model(h, t, output=lambda x, weight, bias: fused_mean_cross_entropy(
            backend, x, weight, bias, tokens, mask))

    def step(tokens, t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(tokens, t)
        loss.backward()
        clip_gradients(clip, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, backend


def make_module_step(model_cfg, vocab: int, fused_ce: str, compiled: bool,
                     device: torch.device, clip: str = "kernel"):
    """algo.FLM's own step outside Lightning: ``compute_loss`` (seeded noise generator,
    antithetic times, the masked-mean fused CE), AdamW as ``configure_optimizers`` builds it,
    grad clip, the EMA update. Against ``dspace`` it prices the production loss path; against
    ``python -m main`` (bench/end_to_end.py), the loop around it."""
    import algo
    from runtime import config as utils

    config = utils.resolve_config(model_config(model_cfg.name, model_cfg.length, [
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

    return step, module.fused_ce_backend()


def measure(model_cfg, vocab: int, variant: str, batch: int, compiled: bool, fused_ce: str,
            device: torch.device, warmup: int, steps: int, peak_flops: float,
            burst: int = 1, clip: str = "kernel") -> dict:
    """One row: step time, tokens/s, MFU and peak memory of one (variant, B, mode)."""
    row = {"variant": variant, "batch": batch, "compiled": compiled, "oom": False}
    reset_memory(device)
    torch.manual_seed(0)
    model = backbone(model_cfg, vocab, device=device) if variant != "module" else None
    try:
        if variant == "module":
            step, row["ce"] = make_module_step(model_cfg, vocab, fused_ce, compiled, device,
                                               clip)
        else:
            if compiled:
                compile_network(model)
            table = AlphaGammaTable(vocab).to(device)
            step, row["ce"] = make_step(model, table, variant, fused_ce, device, clip)
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


# inductor options of the row being measured, over compile_options() (--cudagraphs)
ROW_OPTIONS: dict = {}
CUDAGRAPHS = {"off": {}, "on": {"triton.cudagraphs": True}}


def override_compile_options(pairs: list[str]) -> dict:
    """Replaces models.parallelize.compile_options (what compile_network uses) by its result
    updated with ``KEY=VALUE`` pairs (true/false/ints parsed) and then with ROW_OPTIONS;
    returns the pairs' overrides."""
    import models.parallelize as parallelize

    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--inductor {pair!r}: expected KEY=VALUE")
        extra[key] = {"true": True, "false": False}.get(value.lower(),
                                                        int(value) if value.isdigit() else value)
    base = parallelize.compile_options

    def options():
        merged = {**(base() or {}), **extra, **ROW_OPTIONS}
        return merged or None  # inductor's defaults where nothing is set (the CPU)

    parallelize.compile_options = options
    return extra


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
                   help="an inductor option over models.parallelize.compile_options() for this "
                        "run's compiles (repeatable), e.g. max_autotune_gemm_backends=ATEN,TRITON")
    p.add_argument("--flex-separate", action="store_true",
                   help="call FlexAttention compiled on its own, through a graph break at every "
                        "block (the structure before round 9; models.dit.FLEX_SEPARATE)")
    p.add_argument("--nested-blocks", action="store_true",
                   help="mark DiTBlock.forward as a nested compile region "
                        "(torch.compiler.nested_compile_region): one block compiled, reused")
    p.add_argument("--softcap-forms", default=models.dit.SOFTCAP_FORM,
                   help="comma-separated forms of the attention softcap's tanh, a set of rows "
                        f"each ({', '.join(models.dit.SOFTCAP_FORMS)}; models.dit.SOFTCAP_FORM, "
                        "default: the model's)")
    p.add_argument("--ce-kernels", default=flow.losses.CE_KERNEL,
                   help="comma-separated kernels of the fused CE's chunks, a set of rows each "
                        f"({', '.join(flow.losses.CE_KERNELS)}; flow.losses.CE_KERNEL, default: "
                        "the training's)")
    p.add_argument("--cudagraphs", default="off",
                   help="comma-separated off / on, a set of rows each: the compiled networks' "
                        "forward and backward replayed as CUDA graphs (inductor's "
                        "triton.cudagraphs; no kernel launch gaps), not what the runs do")
    p.add_argument("--clips", default="kernel",
                   help="comma-separated ways to clip the gradients, a set of rows each "
                        f"({', '.join(CLIPS)}; kernel: as the runs clip)")
    args = p.parse_args()
    clips = listed(p, "--clips", args.clips, CLIPS)
    graphs = listed(p, "--cudagraphs", args.cudagraphs, tuple(CUDAGRAPHS))
    inductor = override_compile_options(args.inductor)
    ce_kernels = listed(p, "--ce-kernels", args.ce_kernels, flow.losses.CE_KERNELS)
    bursts = [int(b) for b in args.burst.split(",")]
    if min(bursts) < 1:
        p.error(f"--burst {args.burst}: steps per timed sample must be >= 1")
    forms = listed(p, "--softcap-forms", args.softcap_forms, models.dit.SOFTCAP_FORMS)
    if args.flex_separate:
        models.dit.FLEX_SEPARATE = True
    if args.nested_blocks:
        models.dit.DiTBlock.forward = torch.compiler.nested_compile_region(
            models.dit.DiTBlock.forward)
    vocab = args.vocab or (512 if args.quick else GPT2_VOCAB)
    length = args.length or (64 if args.quick else 1024)
    model_cfg = model_config(args.model or ("tiny" if args.quick else "small"), length)
    batches = [int(b) for b in (args.batches or ("4" if args.quick else "32,64")).split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    rows = []
    settings = [(form, kernel, fused_ce, mode, batch, variant, burst, clip, graph)
                for form in forms for kernel in ce_kernels for fused_ce in args.fused_ce.split(",")
                for mode in args.modes.split(",") for batch in batches
                for variant in args.variants.split(",") for burst in bursts for clip in clips
                for graph in graphs]
    for form, kernel, fused_ce, mode, batch, variant, burst, clip, graph in settings:
        models.dit.SOFTCAP_FORM, flow.losses.CE_KERNEL = form, kernel
        ROW_OPTIONS.clear()
        ROW_OPTIONS.update(CUDAGRAPHS[graph])
        rows.append(measure(model_cfg, vocab, variant, batch, mode == "compiled", fused_ce, device,
                            args.warmup, args.steps, args.peak_flops, burst, clip))
        rows[-1].update(fused_ce=fused_ce, softcap=form, burst=burst, kernel=kernel, clip=clip,
                        graphs=graph)
        print(f"# done softcap {form} CE kernel {kernel} fused_ce={fused_ce} {mode} B={batch} "
              f"{variant} burst {burst} clip {clip} CUDA graphs {graph}", file=sys.stderr,
              flush=True)
    print(f"\nFLM train step, {device_name(device)}, torch {torch.__version__}, V={vocab}, "
          f"L={length}, model={model_cfg.name} (D={model_cfg.hidden_size}, "
          f"blocks={model_cfg.n_blocks}, attn_softcap="
          f"{model_cfg.get('attn_softcap', None)}), bf16 autocast on GPU"
          + (f"; inductor options {inductor}" if inductor else "")
          + ("; FlexAttention through a graph break" if args.flex_separate else "")
          + ("; each DiT block a nested compile region" if args.nested_blocks else ""))
    print("softcap: the form of the attention softcap's tanh (models/dit.py SOFTCAP_FORM); "
          "burst: steps per timed sample (1: a GPU sync after every step); CE kernel: of the "
          "chunked CE's chunks (flow/losses.py CE_KERNEL); clip: how the gradients are clipped "
          "(kernel: the fused AdamW's grad_scale, as the runs clip; inplace: clip_grad_norm_); "
          "graphs: the compiled graphs replayed as CUDA graphs")
    print(f"MFU: {FLOP_FORMULA}; F = {forward_flops_per_token(model_cfg, vocab) / 1e6:.1f} "
          f"MFLOP/token; peak {args.peak_flops / 1e12:.0f} TFLOP/s\n")
    print("| B | mode | fused_ce | CE kernel | softcap | burst | clip | graphs | variant "
          "| first step s | step ms | tokens/s | MFU | peak GiB | vs tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def same_setting(r):
        return (r["softcap"], r["kernel"], r["fused_ce"], r["batch"], r["compiled"], r["burst"],
                r["clip"], r["graphs"])

    floor = {same_setting(r): r for r in rows if r["variant"] == "tokens"}
    for r in rows:
        mode = "compiled" if r["compiled"] else "eager"
        ce = f"{r['fused_ce']} -> {r.get('ce', '?')}"
        head = (f"| {r['batch']} | {mode} | {ce} | {r['kernel']} | {r['softcap']} | {r['burst']} "
                f"| {r['clip']} | {r['graphs']} | {r['variant']} | ")
        if r["oom"]:
            print(head + "out of memory | | | | | |")
            continue
        f = floor.get(same_setting(r))
        ratio = f"{r['tokens_per_s'] / f['tokens_per_s']:.3f}" if f and not f["oom"] else ""
        print(head + f"{r['first_s']:.1f} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['mfu']:.1%} | {r['peak_gib']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
