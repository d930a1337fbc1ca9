"""Checkpoint home: background atomic writes, the resume config check and its overrides, the
run identity and stale temporaries (the run-directory lock: test_reliability_lock.py)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from runtime import checkpointing
from runtime.checkpointing import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    HostBuffers,
    ResumeOverrides,
    check_resume_config,
    compatibility,
    device_storage_sizes,
    find_resume_checkpoint,
    remove_stale_temporaries,
    snapshot_to_cpu,
    write_run_id,
)
from runtime.config import ConfigError, resolve_config
from tests.helpers import compose_config

REPO = Path(__file__).resolve().parents[1]


def _model_state() -> dict:
    """A checkpoint-like dict: tied weights, a view, Adam state, plain leaves."""
    lin = torch.nn.Linear(8, 8)
    emb = torch.nn.Embedding(8, 8)
    emb.weight = lin.weight  # tied: one storage, two entries
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.randn(3, 8)).sum().backward()
    opt.step()
    return {"state_dict": {**lin.state_dict(), **{"emb." + k: v for k, v in
                                                  emb.state_dict().items()}},
            "view": lin.weight.detach()[2:5], "optimizer_states": [opt.state_dict()],
            "global_step": 7, "loops": {"a": [1, (2, "x")]}}


def _bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_snapshot_is_independent_and_serialises_identically():
    state = _model_state()
    snap = snapshot_to_cpu(state)
    assert _bytes(snap) == _bytes(state)
    assert snap["state_dict"]["weight"].untyped_storage().data_ptr() == \
        snap["state_dict"]["emb.weight"].untyped_storage().data_ptr()  # sharing kept
    before = _bytes(snap)
    with torch.no_grad():  # training goes on changing the live tensors
        state["state_dict"]["weight"].add_(1.0)
        state["optimizer_states"][0]["state"][0]["exp_avg"].mul_(3.0)
    assert _bytes(snap) == before


def test_background_write_equals_synchronous_write_bit_for_bit(tmp_path):
    state = _model_state()
    AtomicCheckpointIO(background=False).save_checkpoint(state, tmp_path / "sync.ckpt")
    background = AtomicCheckpointIO(background=True)
    background.save_checkpoint(state, tmp_path / "bg.ckpt")
    with torch.no_grad():
        state["state_dict"]["weight"].zero_()  # after the save returned: must not leak in
    background.wait()
    a, b = (tmp_path / "sync.ckpt").read_bytes(), (tmp_path / "bg.ckpt").read_bytes()
    assert a == b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.ckpt", "sync.ckpt"]


def test_host_buffers_reserved_ahead_are_the_ones_every_save_uses():
    """Buffers reserved from one walk of the sizes serve storages met in another order (matched
    by size); a reserve for other sizes keeps what fits and drops the rest."""
    allocated = []

    def allocate(size):
        allocated.append(size)
        return torch.empty(size, dtype=torch.uint8).untyped_storage()

    buffers = HostBuffers(allocate)
    buffers.reserve([40, 8, 40])
    assert sorted(allocated) == [8, 40, 40] and buffers.fit([40, 40, 8])
    held = {b.data_ptr() for b in buffers._buffers}
    storages = [torch.arange(n, dtype=torch.uint8).untyped_storage() for n in (8, 40, 40)]
    for _ in range(3):  # saves: no new allocation, the same buffers, the right bytes
        buffers.start()
        copies = [buffers.copy(s) for s in storages]
        buffers.finish()
        assert {c.data_ptr() for c in copies} == held and len(allocated) == 3
        for c, s in zip(copies, storages):
            assert bytes(c) == bytes(s)
    buffers.reserve([40, 16])
    assert buffers.fit([16, 40]) and not buffers.fit([40, 40, 8])
    assert allocated[3:] == [16]  # one 40 kept, the other and the 8 dropped


@pytest.mark.cuda
def test_reserved_buffers_take_the_first_save_without_staging(tmp_path):
    """With the buffers reserved ahead (ReserveHostBuffers at the first step's end), the first
    save copies straight into them (the buffers fit: no device staging) and no save allocates."""
    torch.manual_seed(0)
    state = {"state_dict": {"w": torch.randn(1000, 300, device="cuda")},
             "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(77, device="cuda")}}}]}
    io_ = AtomicCheckpointIO(background=True)
    assert io_.reserve_host_buffers(state) == pytest.approx((1000 * 300 + 77) * 4 / 2**30)
    assert io_._host.fit(device_storage_sizes(state))  # save_checkpoint's direct path
    io_._host._allocate = lambda size: pytest.fail(f"a save allocated {size} bytes")
    for k in range(2):
        expected = state["state_dict"]["w"].cpu()
        io_.save_checkpoint(state, tmp_path / f"{k}.ckpt")
        state["state_dict"]["w"].add_(1.0)  # after the save: must not reach the file
        io_.wait()
        loaded = torch.load(tmp_path / f"{k}.ckpt", weights_only=False)
        assert torch.equal(loaded["state_dict"]["w"], expected)


@pytest.mark.cuda
def test_background_write_of_device_state_is_the_state_at_each_save(tmp_path):
    """First save staged on the device (the pinned buffers allocated in the writer thread),
    later saves straight into the reused pinned buffers; work queued right after each save
    returns must not reach its file."""
    torch.manual_seed(0)
    big = torch.randn(64, 2**18, device="cuda")  # 64 MiB: wide enough to race a lazy read
    state = {"state_dict": {"big": big, "view": big[3:9], "small": torch.arange(5.0).cuda()},
             "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(1000, device="cuda")}}}],
             "global_step": 1}
    io_ = AtomicCheckpointIO(background=True)
    for k in range(3):
        expected = snapshot_to_cpu(state)  # blocking copy: the state at this save
        io_.save_checkpoint(state, tmp_path / f"{k}.ckpt")
        for _ in range(20):  # queued after the save's copies, before the writer reads
            big.mul_(1.5).add_(1.0)
        state["optimizer_states"][0]["state"][0]["exp_avg"].zero_()
        io_.wait()
        loaded = torch.load(tmp_path / f"{k}.ckpt", weights_only=False)
        assert _bytes(loaded) == _bytes(expected), k
        assert io_._host.fit(device_storage_sizes(state))


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        io_ = AtomicCheckpointIO()
        io_.save_checkpoint({"x": torch.zeros(2)}, tmp_path / "a.ckpt")
        io_.wait()
        os.umask(0o027)
        io_ = AtomicCheckpointIO()
        io_.save_checkpoint({"x": torch.zeros(2)}, tmp_path / "b.ckpt")
        io_.wait()
    finally:
        os.umask(old)
    assert (tmp_path / "a.ckpt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.ckpt").stat().st_mode & 0o777 == 0o640


def test_writer_error_surfaces_at_next_save_and_at_wait(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"global_step": 1}, path)
    io_.wait()

    real_save = torch.save

    def full_disk(obj, f):  # the disk fills up for steps 2 and 4
        if obj["global_step"] in (2, 4):
            f.write(b"PK partial")
            raise OSError(28, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    io_.save_checkpoint({"global_step": 2}, path)  # returns: the write runs in the thread
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        io_.save_checkpoint({"global_step": 3}, path)  # the next save reports it, saves nothing
    assert torch.load(path, weights_only=False)["global_step"] == 1  # previous file intact
    io_.save_checkpoint({"global_step": 4}, path)
    with pytest.raises(CheckpointWriteError, match=str(path)):
        io_.wait()  # what the entry point calls before exiting
    io_.wait()  # reported once
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_one_write_in_flight(tmp_path, monkeypatch):
    release = threading.Event()
    started = []
    real_save = torch.save

    def slow(obj, f):
        started.append(obj["global_step"])
        release.wait(5)
        real_save(obj, f)

    monkeypatch.setattr(checkpointing.torch, "save", slow)
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"global_step": 1}, tmp_path / "a.ckpt")
    second = threading.Thread(target=io_.save_checkpoint,
                              args=({"global_step": 2}, tmp_path / "b.ckpt"))
    second.start()
    second.join(0.5)
    assert second.is_alive() and started == [1]  # the second save waits for the first write
    release.set()
    second.join(5)
    io_.wait()
    assert started == [1, 2]


KILL_SCRIPT = """
import os, signal, sys, torch
sys.path.insert(0, {repo!r})
from runtime.checkpointing import AtomicCheckpointIO
io = AtomicCheckpointIO()
path = {path!r}
io.save_checkpoint({{"global_step": 1, "w": torch.ones(10)}}, path)
io.wait()
io.save_checkpoint({{"global_step": 2, "w": torch.randn(4_000_000)}}, path)
os.kill(os.getpid(), signal.SIGKILL)  # killed while the background write runs
"""


def test_kill_right_after_a_save_leaves_the_previous_file_loadable(tmp_path, caplog):
    path = tmp_path / "last.ckpt"
    script = KILL_SCRIPT.format(repo=str(REPO), path=str(path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    ckpt = torch.load(path, weights_only=False)
    # either the old file or the complete new one, never a partial file
    assert ckpt["global_step"] in (1, 2) and ckpt["w"].numel() in (10, 4_000_000)
    with caplog.at_level(logging.WARNING):
        removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert all(str(p) in caplog.text for p in removed)


def test_stale_temporaries_are_removed_and_logged(tmp_path, caplog):
    (tmp_path / "last.ckpt").write_bytes(b"keep")
    stale = tmp_path / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"partial")
    (tmp_path / "other.tmp").write_bytes(b"not ours")
    with caplog.at_level(logging.WARNING):
        assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and (tmp_path / "other.tmp").exists()
    assert str(stale) in caplog.text


# --------------------------------------------------------------------------- resume config


def _ckpt(config, step: int = 4) -> dict:
    return {"global_step": step, "hyper_parameters": {
        "config": OmegaConf.to_container(config, resolve=True), "vocab_size": 10}}


def _config(*overrides: str):
    return resolve_config(compose_config(["trainer.accelerator=cpu", *overrides]))


def test_resume_refuses_changes_that_change_the_run():
    saved = _ckpt(_config("trainer.max_steps=10"))
    for overrides, keys in [
        (["optim.lr=1e-3"], ["optim.lr: 0.0003 -> 0.001"]),
        (["training.ema=0.5", "seed=3"], ["seed: 1 -> 3", "training.ema: 0.9999 -> 0.5"]),
        (["lr_scheduler.num_warmup_steps=7"], ["lr_scheduler.num_warmup_steps: 2500 -> 7"]),
        (["model.dropout=0.3"], ["model.dropout: "]),
        (["loader.global_batch_size=16"], ["loader.global_batch_size: 32 -> 16"]),
    ]:
        with pytest.raises(ConfigError) as err:
            check_resume_config(saved, _config("trainer.max_steps=20", *overrides), "x.ckpt")
        for key in keys:
            assert key in str(err.value)
        assert "resume.allow_changes=[" in str(err.value)


def test_resume_passes_allowed_and_named_changes():
    saved = _ckpt(_config("trainer.max_steps=10"))
    changes = check_resume_config(saved, _config(
        "trainer.max_steps=20", "trainer.val_check_interval=7", "loader.batch_size=16",
        "wandb.project=other", "checkpointing.save_dir=/elsewhere", "eval.num_samples=3",
        "sampling.print_samples=0", "callbacks.checkpoint_last.every_n_train_steps=50"),
        "x.ckpt")
    assert changes["trainer.max_steps"] == (10, 20)
    assert changes["trainer.accumulate_grad_batches"] == (1, 2)  # same global batch
    changes = check_resume_config(saved, _config(
        "trainer.max_steps=20", "optim.lr=1e-3", "training.ema=0.5",
        "resume.allow_changes=[optim.lr,training.ema]"), "x.ckpt")
    assert changes["optim.lr"] == (3e-4, 1e-3) and changes["training.ema"] == (0.9999, 0.5)


@pytest.mark.parametrize("max_steps", [3, 4])
def test_resume_with_nothing_to_train_is_an_error(max_steps):
    saved = _ckpt(_config("trainer.max_steps=4"), step=4)
    with pytest.raises(ConfigError, match="at step 4: there is nothing to train"):
        check_resume_config(saved, _config(f"trainer.max_steps={max_steps}"), "x.ckpt")


def test_allowed_changes_take_effect_on_the_restored_optimizer_scheduler_and_ema():
    old = _config("optim.lr=1e-3", "lr_scheduler.num_warmup_steps=10")
    new = _config("optim.lr=2e-3", "lr_scheduler.num_warmup_steps=4", "optim.weight_decay=0.1",
                  "training.ema=0.5")
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param], lr=old.optim.lr)
    warmup = 4  # the lambda the new config builds (algo.FlowLM.configure_optimizers)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    # what Lightning restores: the old run's param groups and base lrs
    optimizer.param_groups[0].update(lr=old.optim.lr * 0.3, initial_lr=old.optim.lr)
    scheduler.base_lrs = [old.optim.lr]
    trainer = SimpleNamespace(optimizers=[optimizer],
                              lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)])
    module = SimpleNamespace(ema=SimpleNamespace(decay=0.9999))
    ResumeOverrides(new, ["optim.lr", "optim.weight_decay", "lr_scheduler.num_warmup_steps",
                          "training.ema"]).on_train_start(trainer, module)
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(2e-3 * min(1.0, 3 / 4))  # step 2 of a 4-step warm-up
    assert group["weight_decay"] == 0.1 and scheduler.base_lrs == [2e-3]
    assert module.ema.decay == 0.5
    scheduler.step()
    assert group["lr"] == pytest.approx(2e-3)  # the schedule goes on from the new base


# --------------------------------------------------------------------------- run id, lock


def _fake(path: Path, step: int, run_id: str | None) -> None:
    torch.save({"global_step": step, "run_id": run_id}, path)


def test_fallback_only_takes_the_same_runs_checkpoints(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    _fake(ckpts / "step00000077.ckpt", 77, "older")  # another run's file in the same directory
    _fake(ckpts / "step00000004.ckpt", 4, "ours")
    last = ckpts / "last.ckpt"
    last.write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match="no run_id file"):
        find_resume_checkpoint(last, fallback_to_previous=True)
    write_run_id(ckpts, "ours")
    with caplog.at_level(logging.WARNING):
        path, ckpt = find_resume_checkpoint(last, fallback_to_previous=True)
    assert path == ckpts / "step00000004.ckpt" and ckpt["global_step"] == 4
    assert "skipping" in caplog.text and "older" in caplog.text
    write_run_id(ckpts, "third")
    with pytest.raises(RuntimeError, match="no periodic checkpoint of run third"):
        find_resume_checkpoint(last, fallback_to_previous=True)


# --------------------------------------------------------------------------- config keys

# keys read by Hydra, Lightning or OmegaConf interpolation rather than by name in our code
READ_OUTSIDE_THE_SOURCES = {"defaults", "hydra"}
# keys whose value is a mapping of data (split name -> size), read as a whole
DATA_MAPPINGS = {"hf_split_sizes"}


def _config_files() -> list[Path]:
    """The project's config files, less configs/hydra/help/ (the text Hydra prints for
    --help: Hydra's keys, read by Hydra)."""
    return sorted(p for p in (REPO / "configs").rglob("*.yaml")
                  if p.parent != REPO / "configs" / "hydra" / "help")


def _sources() -> str:
    files = [p for p in REPO.rglob("*.py") if "tests" not in p.parts and ".venv" not in p.parts]
    scripts = [p for p in (REPO / "scripts").rglob("*") if p.is_file()]
    return "\n".join(p.read_text(errors="replace") for p in files + sorted(scripts))


def _leaf_keys(tree, prefix=()):
    if isinstance(tree, dict) and not (prefix and prefix[-1] in DATA_MAPPINGS):
        for key, value in tree.items():
            yield from _leaf_keys(value, (*prefix, str(key)))
    else:
        yield prefix


def unread_keys(paths: list[Path], sources: str) -> list[str]:
    """A static scan: each key's last name must appear in the code as an attribute or a quoted
    name (``.key``, ``"key"`` or ``'key'``)."""
    unread = []
    for path in paths:
        text = path.read_text()
        if path.parent.name in ("experiment", "launcher") or "# @package _global_" in text:
            continue  # overrides of keys defined elsewhere
        for key in _leaf_keys(OmegaConf.to_container(OmegaConf.load(path), resolve=False)):
            if not key or key[0] in READ_OUTSIDE_THE_SOURCES:
                continue
            name = key[-1]
            if not any(form in sources for form in (f".{name}", f'"{name}"', f"'{name}'")):
                unread.append(f"{path.name}: {'.'.join(key)}")
    return unread


def test_every_config_key_is_read_somewhere():
    unread = unread_keys(_config_files(), _sources())
    assert not unread, "config keys read nowhere:\n" + "\n".join(unread)


def test_the_scan_catches_a_dead_key(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("sampling:\n  steps: [4]\n  num_sample_batches: 1  # read nowhere\n")
    assert unread_keys([config], "steps = config.sampling.steps\n") == [
        "config.yaml: sampling.num_sample_batches"]
    assert unread_keys([config], 'n = sampling["num_sample_batches"]; config.sampling.steps') == []


def test_compatibility_flags_each_disagreement_alone():
    model = {"length": 32, "hidden_size": 64, "n_blocks": 2, "n_heads": 4, "cond_dim": 16,
             "mlp_ratio": 4}
    same = compatibility(100, model, "flm", 100, dict(model), "flm")
    assert same.vocab_size is None and same.algo is None and same.model == ()
    other = compatibility(100, model, "flm", 50, {**model, "hidden_size": 32, "n_heads": 2},
                          "mdlm")
    assert other.vocab_size == (100, 50) and other.algo == ("flm", "mdlm")
    assert other.model == (("hidden_size", 64, 32), ("n_heads", 4, 2))
    # unrecorded entries and entries not asked about are not compared
    unknown = compatibility(None, {"length": 8}, None, 50, {**model, "length": 8}, "flm")
    assert unknown.vocab_size is None and unknown.algo is None and unknown.model == ()
    assert compatibility(100, model, "flm", 100).model == ()  # model=None: evaluation


def test_reserve_callback_reserves_once_after_the_first_step_on_the_writing_rank():
    """ReserveHostBuffers: nothing before an optimizer step has run, then one reservation from
    the checkpoint as it would be saved (built on every rank: a collective under FSDP), held
    only by the writing rank; CPU modules and foreground writers are left alone."""
    from runtime.checkpointing import ReserveHostBuffers

    def run(device: str, background: bool, zero: bool, steps=(0, 1, 2)) -> tuple[int, list]:
        dumps, reserved = [], []
        io_ = AtomicCheckpointIO(background=background)
        io_.reserve_host_buffers = lambda checkpoint: reserved.append(checkpoint) or 1.0
        trainer = SimpleNamespace(strategy=SimpleNamespace(checkpoint_io=io_),
                                  is_global_zero=zero, global_step=0,
                                  _checkpoint_connector=SimpleNamespace(
                                      dump_checkpoint=lambda weights_only: dumps.append(1) or
                                      {"step": trainer.global_step}))
        module = SimpleNamespace(device=torch.device(device))
        callback = ReserveHostBuffers()
        for step in steps:
            trainer.global_step = step
            callback.on_train_batch_end(trainer, module, None, None, 0)
        return len(dumps), reserved

    assert run("cuda", True, True) == (1, [{"step": 1}])
    assert run("cuda", True, False) == (1, [])  # builds (collective), holds nothing
    assert run("cpu", True, True) == (0, [])
    assert run("cuda", False, True) == (0, [])
