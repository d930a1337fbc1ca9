"""ResumableDistributedSampler and FLMDataModule: rank split, epoch orders, exact resume."""

from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from data import FLMDataModule, ResumableDistributedSampler

BATCH = 3


class IndexDataset(torch.utils.data.Dataset):
    """Item i carries i itself, so batches reveal exactly which samples were drawn."""

    def __init__(self, n: int, length: int = 4):
        self.n, self.length = n, length

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": torch.full((self.length,), i, dtype=torch.long),
                "attention_mask": torch.ones(self.length, dtype=torch.long)}


def make_config(num_workers=0, batch_size=BATCH):
    return OmegaConf.create({
        "seed": 7, "model": {"length": 4}, "data": {"name": "index"},
        "loader": {"batch_size": batch_size, "eval_batch_size": 5, "num_workers": num_workers,
                   "pin_memory": False},
    })


def make_module(config, n, rank=0, world=1):
    dm = FLMDataModule(config, tokenizer=None)
    dm.train_dataset, dm.valid_dataset = IndexDataset(n), IndexDataset(n // 2)
    dm.trainer = SimpleNamespace(training=True, global_rank=rank, world_size=world)
    return dm


def batch_ids(batch):
    return batch["input_ids"][:, 0].tolist()


@pytest.mark.parametrize("n, world, drop_last", [(23, 1, True), (23, 4, True), (23, 4, False),
                                                 (24, 3, True)])
def test_ranks_disjoint_and_covering(n, world, drop_last):
    samplers = [ResumableDistributedSampler(n, world, r, seed=3, drop_last=drop_last)
                for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert all(len(p) == len(s) for p, s in zip(per_rank, samplers))
    flat = [i for p in per_rank for i in p]
    if drop_last:
        assert len(flat) == len(set(flat)) == (n // world) * world  # disjoint, nothing repeated
    else:
        assert set(flat) == set(range(n)) and len(flat) == -(-n // world) * world
    # the ranks interleave the one global order
    order = samplers[0].global_order(0)
    assert [per_rank[k % world][k // world] for k in range(len(flat))] == order.tolist()


def test_epoch_orders():
    a, b = ResumableDistributedSampler(50, seed=1), ResumableDistributedSampler(50, seed=1)
    assert list(a) == list(b)
    first = list(a)
    assert sorted(first) == list(range(50))
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    assert list(ResumableDistributedSampler(50, seed=2)) != first
    assert list(ResumableDistributedSampler(50, shuffle=False)) == list(range(50))


def test_stop_state_resume_on_sampler():
    full = list(ResumableDistributedSampler(40, 2, 1, seed=5))
    s = ResumableDistributedSampler(40, 2, 1, seed=5)
    taken = list(s)[: 3 * BATCH]
    s.advance(3 * BATCH)
    fresh = ResumableDistributedSampler(40, 2, 1, seed=5)
    fresh.load_state_dict(s.state_dict())
    assert taken + list(fresh) == full
    assert len(fresh) == len(full)  # len stays the full epoch after a resume


def test_set_epoch_same_epoch_keeps_position():
    s = ResumableDistributedSampler(10, seed=0)
    s.advance(4)
    s.set_epoch(0)
    assert s.consumed == 4
    s.set_epoch(1)
    assert s.consumed == 0


def test_load_state_rejects_another_global_batch():
    s = ResumableDistributedSampler(10, 2, 0)  # global batch 2
    with pytest.raises(ValueError, match="same loader.global_batch_size"):
        ResumableDistributedSampler(10, 4, 0).load_state_dict(s.state_dict())
    s = ResumableDistributedSampler(12, 2, 0, batch_size=2)
    s.advance(1)  # half of this rank's part of a global batch: not an optimizer-step boundary
    with pytest.raises(ValueError, match="not a whole number of global batches"):
        ResumableDistributedSampler(12, 2, 0, batch_size=2).load_state_dict(s.state_dict())


@pytest.mark.parametrize("before, after", [((2, 3, 2), (4, 3, 1)), ((4, 3, 1), (1, 3, 4)),
                                           ((2, 6, 1), (3, 2, 2))])
def test_resume_onto_another_split_of_the_global_batch(before, after):
    """(world, micro-batch, accumulation) with the same global batch of 12: stopped after 2
    global batches and resumed on another split, every later global batch holds the same
    samples as in the uninterrupted run."""
    n, done = 100, 2

    def global_batches(samplers, batch, accumulate):
        per_rank = [list(s) for s in samplers]
        world = len(samplers)
        step = batch * accumulate
        out = []
        for b in range(len(per_rank[0]) // step):
            out.append(sorted(i for r in range(world) for i in per_rank[r][b * step:(b + 1) * step]))
        return out

    def samplers(world, batch, accumulate):
        return [ResumableDistributedSampler(n, world, r, seed=4, batch_size=batch,
                                            accumulate=accumulate) for r in range(world)]

    uninterrupted = global_batches(samplers(*before), *before[1:])
    stopped = samplers(*before)
    for s in stopped:
        s.advance(done * before[1] * before[2])
    resumed = samplers(*after)
    for s in resumed:
        s.load_state_dict(stopped[0].state_dict())  # every rank's state says the same position
    assert global_batches(resumed, *after[1:]) == uninterrupted[done:]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_datamodule_resume_through_dataloader(num_workers, world):
    """Count at the hook, not in the sampler: prefetching workers must not move the resume point."""
    n, k = 61, 4
    config = make_config(num_workers)
    for rank in range(world):
        reference = [batch_ids(b) for b in make_module(config, n, rank, world).train_dataloader()]
        dm = make_module(config, n, rank, world)
        seen = []
        for batch in dm.train_dataloader():  # workers prefetch ahead of the k batches used
            seen.append(batch_ids(dm.on_before_batch_transfer(batch, 0)))
            if len(seen) == k:
                break
        state = dm.state_dict()
        assert state["sampler"]["consumed"] == k * BATCH
        resumed = make_module(config, n, rank, world)
        resumed.load_state_dict(state)  # before the loader exists, as Lightning restores it
        rest = [batch_ids(b) for b in resumed.train_dataloader()]
        assert seen + rest == reference


def test_validation_batches_are_not_counted():
    dm = make_module(make_config(), 20)
    loader = dm.train_dataloader()
    dm.trainer.training = False
    dm.on_before_batch_transfer(next(iter(loader)), 0)
    assert dm.state_dict()["sampler"]["consumed"] == 0


class _RecordingModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch_ids(batch))
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path, config, n, max_steps, accumulate, ckpt=None, save_every=None):
    dm = FLMDataModule(config, tokenizer=None)
    dm.train_dataset, dm.valid_dataset = IndexDataset(n), IndexDataset(4)
    module = _RecordingModule()
    callbacks = []
    if save_every:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{step}",
                                                      every_n_train_steps=save_every,
                                                      save_top_k=-1))
    trainer = pl.Trainer(max_steps=max_steps, accumulate_grad_batches=accumulate,
                         use_distributed_sampler=False, limit_val_batches=0, logger=False,
                         callbacks=callbacks, enable_checkpointing=bool(save_every),
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return module


def test_lightning_checkpoint_resume_is_exact(tmp_path):
    """Checkpoint mid-epoch (ModelCheckpoint, as on preemption) under gradient accumulation and
    prefetching workers; resuming from it replays exactly the batches of the uninterrupted run."""
    config, n, accumulate = make_config(num_workers=2), 60, 2  # 20 batches = 10 steps per epoch
    full = _fit(tmp_path, config, n, max_steps=13, accumulate=accumulate, save_every=4)
    resumed = _fit(tmp_path, config, n, max_steps=13, accumulate=accumulate,
                   ckpt=str(tmp_path / "step=4.ckpt"))
    assert len(full.seen) == 13 * accumulate
    assert resumed.seen == full.seen[4 * accumulate:]
    # the run crossed an epoch boundary: epoch 0 covered every sample once, epoch 1 reshuffled
    epoch0 = np.concatenate(full.seen[:20])
    assert sorted(epoch0.tolist()) == list(range(n))
    assert full.seen[20:23] != full.seen[:3]


# --------------------------------------------------------------------------- one slot rule


@pytest.mark.parametrize("world, accumulate", [(1, 1), (1, 3), (2, 1), (2, 3), (4, 2)])
def test_slot_rule_is_the_samplers_layout(world, accumulate):
    from data import global_batch_slot

    n, batch = 97, 2
    samplers = [ResumableDistributedSampler(n, world, r, seed=5, batch_size=batch,
                                            accumulate=accumulate) for r in range(world)]
    order = samplers[0].global_order(0)
    G = batch * accumulate * world
    for rank, sampler in enumerate(samplers):
        seen = sampler.rank_indices(0).reshape(-1, batch)
        for i, micro in enumerate(seen):  # i: this rank's micro-batch index over the epoch
            slot, num_slots = global_batch_slot(i, accumulate, world, rank)
            assert num_slots * batch == G
            start = (i // accumulate) * G + slot * batch  # brute force: global batch, slot
            assert micro.tolist() == order[start: start + batch].tolist()


def test_resplit_loop_rescales_by_whole_global_batches():
    from runtime.reliability import ResplitLoop

    def checkpoint(ready, saved_accumulate):
        counts = {"ready": ready, "started": ready, "processed": ready, "completed": ready - 1}
        return {"FLMDataModule": {"sampler": {"accumulate": saved_accumulate}},
                "loops": {"fit_loop": {"epoch_loop.batch_progress": {
                    "total": dict(counts), "current": dict(counts)}}}}

    trainer = SimpleNamespace(datamodule=FLMDataModule(make_config(), None),
                              accumulate_grad_batches=1)
    ckpt = checkpoint(ready=6, saved_accumulate=3)  # 2 global batches of 3 micro-batches
    ResplitLoop().on_load_checkpoint(trainer, None, ckpt)
    total = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert total == {"ready": 2, "started": 2, "processed": 2, "completed": 1}
    with pytest.raises(ValueError, match="inside an accumulation cycle"):
        ResplitLoop().on_load_checkpoint(trainer, None, checkpoint(ready=7, saved_accumulate=3))
