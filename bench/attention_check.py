"""Soft-capped attention on CUDA against the float64 math path: error, gradients, peak memory
and time per backend, and a compiled DiT forward against the same DiT in float64 on the CPU.

Run on a GPU machine from the repository root: ``python bench/attention_check.py``.
Prints one table.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from models.dit import DiT  # noqa: E402
from speed.attention import attention, math_attention  # noqa: E402
from speed.compile import compile_network  # noqa: E402


def check(dtype: torch.dtype, causal: bool, b=4, h=12, length=1024, hd=64) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, length, hd, device="cuda", generator=gen) * 4 for _ in range(3))
    grad = torch.randn(b, h, length, hd, device="cuda", generator=gen)
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    ref = math_attention(*ref_in, 50.0, causal)
    ref.backward(grad.double())
    ins = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = attention(*ins, 50.0, causal)  # warm-up / compile
    out.backward(grad.to(dtype))
    for x in ins:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(10):
        out = attention(*ins, 50.0, causal)
        out.backward(grad.to(dtype))
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / 10 * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    scale = ref.abs().max().item()
    gscale = ref_in[0].grad.abs().max().item()
    return {"dtype": str(dtype).split(".")[-1], "causal": causal,
            "max_err/max": (out.double() - ref).abs().max().item() / scale,
            "dq_err/max": (ins[0].grad.double() / 10 - ref_in[0].grad).abs().max().item() / gscale,
            "fwd+bwd_ms": ms, "peak_MiB": peak,
            "math_LxL_MiB": b * h * length * length * torch.finfo(dtype).bits / 8 / 2**20}


def dit_check() -> dict:
    torch.manual_seed(0)
    net = DiT(vocab_size=1000, length=256, hidden_size=256, n_blocks=2, n_heads=4, cond_dim=64,
              double_temb=True, dropout=0.0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    z = torch.randn(2, 256, 1000)
    t, t2 = torch.rand(2), torch.rand(2)
    ref = net.double().logits_from_state(z.double(), t, t2)
    gpu = net.float().cuda()
    compile_network(gpu)
    out = gpu.logits_from_state(z.cuda(), t.cuda(), t2.cuda())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_bf16 = gpu.logits_from_state(z.cuda(), t.cuda(), t2.cuda())
    scale = ref.abs().max().item()
    return {"dit_fp32_err/max": (out.double().cpu() - ref).abs().max().item() / scale,
            "dit_bf16_err/max": (out_bf16.double().cpu() - ref).abs().max().item() / scale}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(torch.__version__, torch.cuda.get_device_name())
    rows = [check(dtype, causal) for dtype in (torch.float32, torch.bfloat16)
            for causal in (False, True)]
    print("| " + " | ".join(rows[0]) + " |")
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v)
                                for v in row.values()) + " |")
    print(dit_check())
