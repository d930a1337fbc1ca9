"""N processes equal 1 process with accumulation: same samples per slot, same time draws, and
(end to end, 2 CPU processes over gloo, under ddp and fsdp) the same parameters."""

from __future__ import annotations

import os
import shutil
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import algo
from data import ResumableDistributedSampler
from runtime import reliability
from runtime.config import resolve_config
from tests.helpers import compose_config
from tests.test_resume import load, run_main, run_until_signal


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch):
    """Every run of this file on one intra-op thread per process. Lightning's CPU DDP sets
    ``torch.set_num_threads(cores // world)`` unless OMP_NUM_THREADS is set, so 2 processes
    would run their kernels on another thread count (another summation order) than 1 process;
    with equal thread counts the N-process and 1-process runs compute the same sums."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def slot_batches(n: int, world: int, accumulate: int, batch: int, seed: int = 3,
                 epoch: int = 0) -> dict[tuple[int, int], list[int]]:
    """{(global batch, slot): sample indices} as the ranks' samplers hand them out."""
    out = {}
    for rank in range(world):
        sampler = ResumableDistributedSampler(n, world, rank, seed=seed, batch_size=batch,
                                              accumulate=accumulate)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        micro = [indices[i:i + batch] for i in range(0, len(indices), batch)]
        for j, samples in enumerate(micro):  # j-th micro-batch of this rank
            b, a = divmod(j, accumulate)
            out[(b, a * world + rank)] = samples
    return out


@pytest.mark.parametrize("n", [101, 96])
def test_global_batch_slots_do_not_depend_on_the_split(n):
    global_batch, batch = 24, 3
    splits = [(1, 8), (2, 4), (4, 2), (8, 1)]  # (world, accumulate), all with 24 = w * a * 3
    layouts = [slot_batches(n, w, a, batch, epoch=1) for w, a in splits]
    assert all(layout == layouts[0] for layout in layouts[1:])
    # independent reference: contiguous blocks of the epoch's permutation
    perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence([3, 1]))).permutation(n)
    expected = {(b, s): perm[b * global_batch + s * batch: b * global_batch + (s + 1) * batch]
                .tolist() for b in range(n // global_batch) for s in range(global_batch // batch)}
    assert layouts[0] == expected


def _draw(world: int, rank: int, accumulate: int, batch_idx: int, step: int) -> torch.Tensor:
    config = resolve_config(compose_config(["model.length=8", "model.hidden_size=16",
                                            "model.n_heads=2", "model.n_blocks=1"]))
    module = algo.FLM(config, vocab_size=16)
    module._trainer = SimpleNamespace(accumulate_grad_batches=accumulate, world_size=world,
                                      global_rank=rank)
    return module.draw_times(4, step, batch_idx)


def test_time_draws_across_ranks_are_the_global_antithetic_set():
    step = 5
    two_ranks = torch.cat([_draw(2, r, 1, 0, step) for r in range(2)])
    one_rank = torch.cat([_draw(1, 0, 2, i, step) for i in range(2)])
    assert torch.equal(two_ranks, one_rank)  # slot s holds the same draws either way
    # the 8 draws are offset + k/8 mod 1 for one offset: equally spaced on the circle
    gaps = torch.diff(torch.sort(two_ranks.double()).values)
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / 8), atol=1e-6)
    assert not torch.equal(two_ranks, torch.cat([_draw(2, r, 1, 0, step + 1) for r in range(2)]))


@pytest.mark.slow
# fused=true: the non-finite verdict is reduced over ranks on the device (found_inf path)
@pytest.mark.parametrize("fused", ["false", "true"])
def test_two_process_ddp_equals_one_process_with_accumulation(tmp_path, fused):
    common = ["model.dropout=0", "trainer.max_steps=3", "strategy=ddp", f"optim.fused={fused}"]
    run_main(tmp_path / "ddp", *common, "trainer.devices=2")
    run_main(tmp_path / "single", *common, "trainer.devices=1")
    ddp = load(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    single = load(tmp_path / "single" / "checkpoints" / "last.ckpt")
    assert ddp["global_step"] == single["global_step"] == 3
    assert ddp["FLMDataModule"]["sampler"]["accumulate"] == 1
    assert single["FLMDataModule"]["sampler"]["accumulate"] == 2
    earlier = load(tmp_path / "single" / "checkpoints" / "step00000002.ckpt")["state_dict"]
    moved = 0.0
    for key, value in single["state_dict"].items():
        # gradient all-reduce sums in another order: agreement to float32 round-off
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((value - earlier[key]).abs().max()))
    assert moved > 1e-4  # the last step did move the weights by far more than the tolerance


@pytest.mark.slow
def test_two_process_fsdp_equals_one_process_and_resumes_under_any_split(tmp_path):
    """strategy=fsdp (FSDP2, 2 CPU processes over gloo): at step 2 the gathered checkpoint equals
    1 process with accumulation 2. Continued to step 3 from that checkpoint under fsdp, under
    ddp, and on 1 process with accumulation 2, and the 1-process step-2 checkpoint continued on
    2 fsdp processes: each equals the uninterrupted single-process run (weights, EMA, Adam)."""
    common = ["model.dropout=0", "training.ema=0.5"]
    run_main(tmp_path / "single", *common, "trainer.max_steps=3", "trainer.devices=1")
    run_main(tmp_path / "fsdp", *common, "trainer.max_steps=2", "trainer.devices=2",
             "strategy=fsdp")
    shutil.copytree(tmp_path / "fsdp", tmp_path / "ddp")
    shutil.copytree(tmp_path / "fsdp", tmp_path / "shrink")
    shutil.copytree(tmp_path / "single", tmp_path / "grow")
    single2 = load(tmp_path / "single" / "checkpoints" / "step00000002.ckpt")
    fsdp2 = load(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")
    assert fsdp2["global_step"] == 2
    for key, value in single2["state_dict"].items():
        torch.testing.assert_close(fsdp2["state_dict"][key], value, rtol=1e-5, atol=1e-6)
    run_main(tmp_path / "fsdp", *common, "trainer.max_steps=3", "trainer.devices=2",
             "strategy=fsdp")
    run_main(tmp_path / "ddp", *common, "trainer.max_steps=3", "trainer.devices=2",
             "strategy=ddp")
    run_main(tmp_path / "shrink", *common, "trainer.max_steps=3", "trainer.devices=1")
    grow_from = tmp_path / "grow" / "checkpoints" / "step00000002.ckpt"
    run_main(tmp_path / "grow", *common, "trainer.max_steps=3", "trainer.devices=2",
             "strategy=fsdp", f"checkpointing.resume_ckpt_path={grow_from}")
    single = load(tmp_path / "single" / "checkpoints" / "last.ckpt")
    moved = max(float((v - single2["state_dict"][k]).abs().max())
                for k, v in single["state_dict"].items())
    assert moved > 1e-4  # step 3 moved the weights by far more than the tolerance
    for name in ("fsdp", "ddp", "shrink", "grow"):
        other = load(tmp_path / name / "checkpoints" / "last.ckpt")
        assert other["global_step"] == 3
        assert other["FLMDataModule"]["sampler"]["epoch"] == 0  # the epoch went on
        # one resume point: no second "last" copy written as training ended
        assert not list((tmp_path / name / "checkpoints").glob("last-v*"))
        for key, value in single["state_dict"].items():
            torch.testing.assert_close(other["state_dict"][key], value, rtol=1e-5, atol=1e-6)
        for key, value in single["ema"]["shadow"].items():
            torch.testing.assert_close(other["ema"]["shadow"][key], value, rtol=1e-5, atol=1e-6)
        for index, state in single["optimizer_states"][0]["state"].items():
            for moment in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(other["optimizer_states"][0]["state"][index][moment],
                                           state[moment], rtol=1e-4, atol=1e-9,
                                           msg=f"parameter {index}, {moment} differs")
    # the fsdp checkpoint evaluates; with strategy=fsdp still set, evaluation runs unsharded
    evaluated = run_main(tmp_path / "fsdp", *common, "mode=ppl_eval", "strategy=fsdp",
                         f"eval.checkpoint_path={tmp_path / 'fsdp' / 'checkpoints' / 'last.ckpt'}")
    assert "ppl_eval of " in evaluated.stdout + evaluated.stderr  # evaluation/ppl.describe


@pytest.mark.slow
def test_sigusr1_on_one_rank_checkpoints_requeues_once_and_stops_all_ranks(tmp_path):
    """SIGUSR1 reaches rank 0 only (Lightning's launcher started rank 1): the flag is reduced over
    ranks, so both save one consistent last.ckpt and exit instead of hanging; rank 0 alone runs
    `scontrol requeue` (a stand-in on PATH records the call)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    env.pop("SLURM_NTASKS", None)
    run_dir = tmp_path / "run"
    result, output = run_until_signal(run_dir, signal.SIGUSR1, "step00000002.ckpt", env,
                                      "model.dropout=0", "trainer.devices=2", "strategy=ddp")
    assert result.returncode == reliability.EXIT_PREEMPTED, output[-4000:]
    assert "stopped by SIGUSR1" in output
    assert calls.read_text().splitlines() == ["requeue 4242"]
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = load(last)
    assert ckpt["global_step"] >= 2
    assert len(ckpt["rng_states"]) == 2  # both ranks' RNG states gathered into the checkpoint
    # a truncated last.ckpt: one clear error naming the file, before any training
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    failed = run_main(run_dir, "trainer.max_steps=100", check=False)
    assert failed.returncode != 0
    assert f"resume checkpoint {last} is corrupt or truncated" in failed.stderr
    assert "fallback_to_previous" in failed.stderr
    assert load(run_dir / "checkpoints" / "step00000002.ckpt")["global_step"] == 2  # intact
