"""Shared pieces of the benches: the backbone as the config builds it, FLOP counts, timing."""

from __future__ import annotations

import contextlib
import gc
import statistics
import sys
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from settings import GPT2_VOCAB, ROOT  # noqa: F401  (re-exported to the benches)

sys.path.insert(0, str(ROOT))

from models.dit import DiT, build_backbone  # noqa: E402
from speed import SpeedOptions  # noqa: E402

H100_BF16_PEAK = 989e12  # dense bf16 tensor-core FLOP/s of an H100 SXM (MFU denominator)
FLOP_FORMULA = ("forward FLOPs/token F = n_blocks·(24·D² + 4·L·D) + 2·D·V "
                "(qkv 6D², attn-out 2D², MLP 16D², QKᵀ and AV 2·L·D each; output layer 2·D·V); "
                "a training step counts 3·F per token (forward + backward)")


def model_config(name: str, length: int, overrides: list[str] | None = None,
                 full: bool = False) -> DictConfig:
    """``configs/model/<name>.yaml`` as Hydra composes it (e.g. model.attn_softcap comes along);
    ``full``: the whole composed config instead of its model group."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="config",
                      overrides=[f"model={name}", f"model.length={length}"] + (overrides or []))
    return cfg if full else cfg.model


def backbone(model_cfg: DictConfig, vocab: int, double_temb: bool = False,
             device: torch.device | str = "cpu", fused_ce: str = "auto") -> DiT:
    """A DiT with the fused kernels on (on CUDA) and ``fused_ce`` (a training.fused_ce value),
    compiled or not by the caller (speed.compile.compile_network)."""
    speed = SpeedOptions.from_settings(True, fused_ce)
    return build_backbone(model_cfg, vocab, double_temb, speed=speed).to(device)


def forward_flops_per_token(model_cfg: DictConfig, vocab: int) -> float:
    """F of ``FLOP_FORMULA``: one forward pass of the backbone per token."""
    d, n, length = model_cfg.hidden_size, model_cfg.n_blocks, model_cfg.length
    return n * (24 * d * d + 4 * length * d) + 2 * d * vocab


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    return tokens_per_s * flops_per_token / peak


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, warmup: int, iters: int, burst: int = 1) -> float:
    """Median seconds of one ``fn()`` over ``iters`` samples after ``warmup`` calls; a sample
    times ``burst`` back-to-back calls between two syncs, divided by ``burst`` (so the host's
    launch time overlaps the GPU's work, as in a training loop)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        for _ in range(burst):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / burst)
    return statistics.median(times)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu"


def gpu_bf16_autocast(device: torch.device):
    """bf16 autocast on CUDA (the paper's precision), nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
