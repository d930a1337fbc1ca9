"""FlexAttention's block sizes on this GPU: what inductor's autotuning picks for the soft-capped
attention at the presets' shapes, and what a forward + backward costs with those sizes fixed.

    python bench/flex_configs.py                       # GPU: B=32, H=12, hd=64, L=1024,128
    python bench/flex_configs.py --lengths 1024 --causal

For each shape, three compiles of ``flex_attention`` with the run's score_mod
(``speed.attention.softcap_score_mod``), in a new inductor cache made for this process (the
second and third may reuse kernels that the first's autotuning compiled: their compile
times are lower bounds; ``bench/cold_start.py`` times what a run pays):

* autotuned: ``max_autotune`` (inductor benchmarks its candidate block sizes at compile time);
* fixed: the autotuned winners passed as ``kernel_options`` (``fwd_*``/``bwd_*``), no autotuning;
* default: inductor's own block sizes, no autotuning.

Prints one table (compile time of the first forward + backward, median time of one forward +
backward after it, ratio to autotuned) and the winners as ``kernel_options`` dicts.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="flex-configs-")

import torch  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import device_name, timed  # noqa: E402
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402

from speed.attention import _causal_block_mask, softcap_score_mod  # noqa: E402

FWD_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
BWD_KEYS = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "num_warps", "num_stages")
AUTOTUNE_BLOCK = re.compile(r"AUTOTUNE (flex_attention(?:_backward)?)\(.*?\n(?:.*\n){2}"
                            r"\s+\S+ [0-9.]+ ms [0-9.]+% (.*)\n")


class Tee(io.TextIOBase):
    """sys.stderr that also keeps what is written (inductor writes its autotuning tables
    with sys.stderr.write)."""

    def __init__(self, stream):
        self.stream, self.kept = stream, []

    def write(self, text):
        self.kept.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def winners(log: str) -> dict:
    """The fastest candidate's options of the forward and backward autotuning tables in
    ``log``, as kernel_options (``fwd_``/``bwd_`` prefixed)."""
    found = {}
    for name, description in AUTOTUNE_BLOCK.findall(log):
        pairs = dict(re.findall(r"(\w+)=([^,\s]+)", description))
        prefix, keys = ("bwd_", BWD_KEYS) if name.endswith("backward") else ("fwd_", FWD_KEYS)
        found.update({prefix + k: int(pairs[k]) for k in keys if k in pairs})
    return found


def run(variant: str, q, k, v, grad, score_mod, mask, kernel_options=None):
    torch._dynamo.reset()
    options = {"max_autotune": variant == "autotuned", "max_autotune_gemm_backends": "ATEN"}
    if hasattr(inductor_config, "autotune_num_choices_displayed"):  # newer torch only
        options["autotune_num_choices_displayed"] = 1  # the winner's line (the default: 10)
    compiled = torch.compile(flex_attention, dynamic=False, options=options)
    ins = [x.detach().requires_grad_() for x in (q, k, v)]

    def step():
        out = compiled(*ins, score_mod=score_mod, block_mask=mask,
                       kernel_options=kernel_options)
        out.backward(grad)
        return out

    tee = Tee(sys.stderr)
    sys.stderr = tee
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = step()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
    finally:
        sys.stderr = tee.stream
    device = q.device
    ms = timed(step, device, warmup=3, iters=20, burst=4) * 1e3
    return {"first_s": first, "ms": ms, "out": out.detach().float(),
            "log": "".join(tee.kept)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--lengths", default="1024,128")
    p.add_argument("--softcap", type=float, default=50.0)
    p.add_argument("--causal", action="store_true", help="causal block mask (the AR model)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/flex_configs.py needs a CUDA GPU")
    device = torch.device("cuda")
    score_mod = softcap_score_mod(args.softcap)
    print(f"FlexAttention forward + backward, bf16, B={args.batch}, H={args.heads}, "
          f"hd={args.head_dim}, softcap {args.softcap}, causal {args.causal}; "
          f"{device_name(device)}, torch {torch.__version__}\n")
    print("| L | block sizes | compile (first fwd+bwd) s | fwd+bwd ms | vs autotuned |")
    print("|---|---|---|---|---|", flush=True)
    found = {}
    for length in (int(x) for x in args.lengths.split(",")):
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (args.batch, args.heads, length, args.head_dim)
        q, k, v, grad = (torch.randn(shape, device=device, generator=gen).bfloat16()
                         for _ in range(4))
        mask = _causal_block_mask(length, device) if args.causal else None
        tuned = run("autotuned", q, k, v, grad, score_mod, mask)
        options = winners(tuned["log"])
        found[length] = options
        rows = [("autotuned", tuned)]
        if set(options) == {f"fwd_{k}" for k in FWD_KEYS} | {f"bwd_{k}" for k in BWD_KEYS}:
            rows.append(("fixed (autotuned winners)",
                         run("fixed", q, k, v, grad, score_mod, mask, options)))
        else:
            print(f"L={length}: winners not found in inductor's tables: {options}",
                  file=sys.stderr)
        rows.append(("inductor default", run("default", q, k, v, grad, score_mod, mask)))
        for name, r in rows:
            diff = (r["out"] - tuned["out"]).abs().max().item()
            print(f"| {length} | {name} | {r['first_s']:.1f} | {r['ms']:.3f} | "
                  f"{r['ms'] / tuned['ms']:.3f} (max |out diff| {diff:.1e}) |", flush=True)
    print()
    for length, options in found.items():
        print(f"L={length} kernel_options: {options}")


if __name__ == "__main__":
    main()
