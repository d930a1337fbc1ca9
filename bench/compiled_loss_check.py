"""The distillation losses compiled whole against eager on tiny problems; two tables.

    python bench/compiled_loss_check.py        # GPU (CPU: inductor's C++ backend)

At L = 8 the compiled-whole test of tests/test_fused_kernels.py failed on an H100 (stage 1:
1.530 compiled, 1.172 eager; bench/RESULTS.md): compiled FlexAttention is wrong below
speed.attention.FLEX_MIN_LENGTH, which now routes such lengths to the plain attention. Each
row compiles the stage-1 and stage-2 losses at one length with other settings: speed.compile's
options, the same without autotuning, AOTAutograd without inductor (``aot_eager``), dynamo
alone (``eager``); then the soft-capped attention alone, compiled, against the plain
computation at each length.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flow.flow_map import Interval, flow_map_matching_loss, semigroup_loss  # noqa: E402
from flow.path import joint_gaussian_projection  # noqa: E402
from flow.schedule import AlphaGammaTable  # noqa: E402
from models.dit import DiT  # noqa: E402
from speed.attention import attention, math_attention  # noqa: E402
from speed.compile import compile_options  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 300  # unaligned; head size 16
LENGTHS = (8, 16, 128)


def tiny(double_temb: bool, seed: int, length: int) -> DiT:
    torch.manual_seed(seed)
    net = DiT(vocab_size=VOCAB, length=length, hidden_size=32, n_blocks=1, n_heads=2,
              cond_dim=8, dropout=0.0, double_temb=double_temb).to(DEVICE)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


def problem(stage: int, length: int):
    networks = [tiny(False, 0, length).eval()] + [tiny(True, s, length)
                                                  for s in range(1, stage + 1)]
    for n in networks[:-1]:
        n.requires_grad_(False)
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    tokens = torch.randint(0, VOCAB, (2, length), device=DEVICE, generator=gen)
    s = torch.rand(2, device=DEVICE, generator=gen, dtype=torch.float64) * 0.5
    interval = Interval.from_endpoints(AlphaGammaTable(VOCAB), s, s + 0.4)
    noise = joint_gaussian_projection([n.input_embedding for n in networks], (2, length), gen)
    return networks, tokens, interval, noise


def settings() -> list[tuple[str, dict]]:
    options = compile_options() or {}
    return [("speed.compile options", {"options": options or None}),
            ("without autotuning", {"options": {**options, "max_autotune": False}}),
            ("aot_eager", {"backend": "aot_eager"}),
            ("dynamo only", {"backend": "eager"})]


def main() -> None:
    print(f"Distillation losses compiled whole vs eager, {DEVICE}, torch {torch.__version__}\n")
    print("| loss | L | eager | " + " | ".join(name for name, _ in settings()) + " |")
    print("|---|---|---|" + "---|" * len(settings()))
    for (stage, loss), length in ((s, n) for s in ((1, semigroup_loss),
                                                   (2, flow_map_matching_loss))
                                  for n in LENGTHS):
        args = problem(stage, length)
        cells = [f"stage {stage}", str(length),
                 f"{float(loss(*args[0], *args[1:]).sum()):.6f}"]
        for _, kwargs in settings():
            torch._dynamo.reset()
            try:
                value = torch.compile(loss, dynamic=False, **kwargs)(*args[0], *args[1:])
                cells.append(f"{float(value.sum()):.6f}")
            except Exception as error:  # a failing setting is a finding: the row goes on
                cells.append(f"error {type(error).__name__}")
        print("| " + " | ".join(cells) + " |", flush=True)
    print("\n| attention, L | eager vs plain | compiled vs plain |\n|---|---|---|")
    for length in LENGTHS:
        q, k, v = (torch.randn(2, 2, length, 16, device=DEVICE) for _ in range(3))
        plain = math_attention(q, k, v, 50.0, False)
        torch._dynamo.reset()
        compiled = torch.compile(lambda a, b, c: attention(a, b, c, 50.0, False),
                                 dynamic=False, options=compile_options())(q, k, v)
        eager = attention(q, k, v, 50.0, False)
        print(f"| {length} | {float((eager - plain).abs().max()):.2e} | "
              f"{float((compiled - plain).abs().max()):.2e} |", flush=True)


if __name__ == "__main__":
    main()
