"""Data-parallel scaling of FLM training: tokens/s per GPU on 1, 2, 4, 8 GPUs, ddp and fsdp.

    python bench/scaling.py             # DiT small, L=1024, 32 sequences per GPU, bf16, compiled
    python bench/scaling.py --quick     # CPU smoke test: tiny model, gloo, 1 and 2 processes
    python bench/scaling.py --strategies fsdp --worlds 8

For each strategy and world size up to the GPUs present, one process per GPU runs the FLM
training step (``algo.FLM.compute_loss``: time draw, D-space corruption, DiT, cross-entropy),
backward with the gradient reduction (ddp: DistributedDataParallel all-reduce; fsdp: the
sharding of ``algo.FlowLM.configure_model``, reduce-scatter), gradient clipping, AdamW and the
EMA update, on random tokens (no data loading, no Lightning loop). Prints one table: tokens/s
per GPU, total, scaling efficiency (tokens/s per GPU relative to the same strategy on 1 GPU)
and peak memory on rank 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FULL = {"model": "small", "length": 1024, "batch": 32, "vocab": 50258, "warmup": 10, "steps": 30,
        "compile": True, "worlds": (1, 2, 4, 8)}  # gpt2 + [PAD] vocabulary, as on OpenWebText
QUICK = {"model": "tiny", "length": 32, "batch": 4, "vocab": 64, "warmup": 2, "steps": 3,
         "compile": False, "worlds": (1, 2)}


class TrainingLoss(nn.Module):
    """The FLM loss as a module, so DDP sees one forward per step."""

    def __init__(self, flm) -> None:
        super().__init__()
        self.flm = flm

    def forward(self, batch: dict, step: int) -> torch.Tensor:
        return self.flm.compute_loss(batch, step, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(setup: dict, world: int, run_dir: str, strategy: str):
    from hydra import compose, initialize_config_dir

    from runtime.config import resolve_config
    overrides = [f"model={setup['model']}", f"model.length={setup['length']}",
                 f"loader.global_batch_size={setup['batch'] * world}",
                 f"loader.batch_size={setup['batch']}", f"trainer.devices={world}",
                 f"training.compile={setup['compile']}", f"checkpointing.save_dir={run_dir}",
                 f"eval.output_dir={run_dir}/eval", f"strategy={strategy}"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return resolve_config(compose(config_name="config", overrides=overrides))


def _worker(rank: int, world: int, setup: dict, strategy: str, port: int, out_dir: str) -> None:
    import algo
    from runtime.optim import StepHealth, clip_by_global_norm

    cuda = torch.cuda.is_available() and not setup["cpu"]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    config = _config(setup, world, out_dir, strategy)
    flm = algo.FLM(config, vocab_size=setup["vocab"]).to(device)
    flm.ema.to(device)
    if strategy == "fsdp":  # the same sharding as training with strategy=fsdp
        from torch.distributed.device_mesh import init_device_mesh
        flm._device_mesh = init_device_mesh(device.type, (world,),
                                            mesh_dim_names=("data_parallel",))
        flm.configure_model()
        model = TrainingLoss(flm)
    else:
        model = DistributedDataParallel(TrainingLoss(flm), device_ids=[rank] if cuda else None,
                                        gradient_as_bucket_view=True)
    optimizer = torch.optim.AdamW(flm.parameters(), lr=3e-4, fused=cuda)
    gen = torch.Generator(device=device).manual_seed(rank)
    tokens = torch.randint(0, setup["vocab"], (setup["batch"], setup["length"]), device=device,
                           generator=gen)
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    for step in range(setup["warmup"] + setup["steps"]):
        if step == setup["warmup"]:
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
        with autocast:
            loss = model(batch, step)
        loss.backward()
        # as the runs clip (DTensor: over all shards)
        StepHealth(grad_scale=clip_by_global_norm(optimizer, 1.0)[1]).hand_to(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        flm.ema.update(flm.backbone)
    if cuda:
        torch.cuda.synchronize()
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    if rank == 0:
        per_gpu = setup["steps"] * setup["batch"] * setup["length"] / float(elapsed)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
        Path(out_dir, f"{strategy}{world}.txt").write_text(f"{per_gpu} {peak}")
    dist.destroy_process_group()


def measure(world: int, setup: dict, strategy: str) -> tuple[float, float]:
    """(tokens/s per GPU, peak GiB on rank 0) with ``world`` processes."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world, setup, strategy, _free_port(), out_dir),
                           nprocs=world, start_method="spawn")
        per_gpu, peak = Path(out_dir, f"{strategy}{world}.txt").read_text().split()
    return float(per_gpu), float(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke test (tiny model, gloo)")
    parser.add_argument("--worlds", type=int, nargs="*", help="world sizes (default 1 2 4 8)")
    parser.add_argument("--steps", type=int, help="timed steps per world size")
    parser.add_argument("--no-compile", action="store_true", help="eager backbone")
    parser.add_argument("--strategies", nargs="*", default=["ddp", "fsdp"],
                        choices=["ddp", "fsdp"], help="default: both")
    args = parser.parse_args()
    setup = dict(QUICK if args.quick else FULL)
    setup["cpu"] = args.quick or not torch.cuda.is_available()
    if args.steps:
        setup["steps"] = args.steps
    if args.no_compile:
        setup["compile"] = False
    available = 2 if setup["cpu"] else torch.cuda.device_count()
    worlds = [w for w in (args.worlds or setup["worlds"]) if w <= available]
    if not worlds:
        raise SystemExit(f"no world size in {args.worlds or setup['worlds']} fits the "
                         f"{available} devices here")
    device = "cpu (gloo)" if setup["cpu"] else torch.cuda.get_device_name(0)
    print(f"# FLM training, DiT {setup['model']}, L={setup['length']}, {setup['batch']} "
          f"sequences per process, V={setup['vocab']}, compile={setup['compile']}, {device}")
    print(f"{'strategy':>8} {'GPUs':>5} {'tokens/s/GPU':>14} {'tokens/s total':>15} "
          f"{'efficiency':>11} {'peak GiB':>9}")
    for strategy in args.strategies:
        base = None
        for world in worlds:
            per_gpu, peak = measure(world, setup, strategy)
            base = base or per_gpu
            print(f"{strategy:>8} {world:>5} {per_gpu:>14.0f} {per_gpu * world:>15.0f} "
                  f"{per_gpu / base:>11.1%} {peak:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
