"""The resumable data sampler and the global-batch slot rule it shares with the training loop.

One home for the layout of a global batch: micro-batch ``i`` of a rank is accumulation step
``i % accumulate`` of global batch ``i // accumulate`` (:func:`split_micro_batch_index`), and
owns slot ``(i % accumulate) * world + rank`` of ``accumulate * world`` slots
(:func:`global_batch_slot`). The sampler lays the samples out by slot, ``algo.FlowLM`` keys its
noise and time draws by slot, and ``reliability.ResplitLoop`` rescales Lightning's micro-batch
counters by whole global batches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)


def split_micro_batch_index(micro_batch_index: int, accumulate: int) -> tuple[int, int]:
    """(global batch, accumulation step) of a rank's ``micro_batch_index``-th micro-batch."""
    return divmod(micro_batch_index, accumulate)


def global_batch_slot(micro_batch_index: int, accumulate: int, world: int,
                      rank: int) -> tuple[int, int]:
    """(slot, number of slots) of a rank's micro-batch within its global batch.

    ``slot = (micro_batch_index % accumulate) * world + rank`` of ``accumulate * world`` slots:
    the same slot holds the same samples and the same random draws under any split of the
    global batch into ranks and accumulation steps."""
    _, step = split_micro_batch_index(micro_batch_index, accumulate)
    return step * world + rank, accumulate * world


class ResumableDistributedSampler(torch.utils.data.Sampler[int]):
    """Epoch-wise permutation laid out by global batch, that resumes mid-epoch exactly.

    Epoch ``e``'s global order is a permutation drawn from ``(seed, e)`` (or the identity if
    ``shuffle=False``), cut into global batches of ``G = batch_size * accumulate * num_replicas``
    samples. Micro-batch slot ``s = a * num_replicas + rank`` (``a`` = accumulation index) of
    global batch ``b`` holds ``order[b*G + s*batch_size : b*G + (s+1)*batch_size]``, so a global
    batch holds the same samples, slot by slot, whatever split of ``G`` into ranks and
    accumulation steps: the data side of "N GPUs equal 1 GPU with accumulation" (the noise and
    time draws are keyed by the same slot, :func:`global_batch_slot`). With ``batch_size =
    accumulate = 1`` this is the usual strided split ``order[rank::num_replicas]``.

    The epoch has ``len // G`` global batches (``drop_last``) or the order padded by wrapping
    around to a multiple of ``G``. Iteration starts after the ``consumed`` samples of this rank;
    ``consumed`` advances only through :meth:`advance`, called by whoever hands batches to the
    training loop (see :class:`FLMDataModule`), so DataLoader prefetching does not count as
    consumption. ``len()`` is the full per-rank epoch, also after a resume (Lightning counts
    batches of the epoch with it)."""

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 batch_size: int = 1, accumulate: int = 1):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        if batch_size < 1 or accumulate < 1:
            raise ValueError(f"batch_size={batch_size} and accumulate={accumulate} must be >= 1")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.batch_size = batch_size
        self.accumulate = accumulate
        self.global_batch = batch_size * accumulate * num_replicas
        if drop_last:
            self.num_global_batches = dataset_len // self.global_batch
        else:
            self.num_global_batches = math.ceil(dataset_len / self.global_batch)
        if self.num_global_batches == 0:
            raise ValueError(f"dataset of {dataset_len} samples is smaller than one global batch "
                             f"of {self.global_batch} (loader.global_batch_size)")
        self.num_samples = self.num_global_batches * batch_size * accumulate  # per rank
        self.epoch = 0
        self.consumed = 0

    def global_order(self, epoch: int) -> np.ndarray:
        """All ranks' indices of ``epoch``, truncated or padded to whole global batches."""
        if self.shuffle:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            order = rng.permutation(self.dataset_len)
        else:
            order = np.arange(self.dataset_len)
        total = self.num_global_batches * self.global_batch
        if total > self.dataset_len:
            order = np.resize(order, total)  # wrap around: repeats the first entries
        return order[:total]

    def rank_indices(self, epoch: int) -> np.ndarray:
        """This rank's indices in the order it sees them: (global batch, accumulation, sample)."""
        num_slots = self.accumulate * self.num_replicas
        slots = [global_batch_slot(a, self.accumulate, self.num_replicas, self.rank)[0]
                 for a in range(self.accumulate)]
        blocks = self.global_order(epoch).reshape(self.num_global_batches, num_slots,
                                                  self.batch_size)
        return blocks[:, slots, :].reshape(-1)

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices(self.epoch)[self.consumed:].tolist())

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; a call with the current epoch (Lightning does so on resume) keeps the
        position within it."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    def advance(self, num_samples: int) -> None:
        """Record that ``num_samples`` more samples of this rank reached the training loop."""
        self.consumed += num_samples

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "num_replicas": self.num_replicas,
                "batch_size": self.batch_size, "accumulate": self.accumulate,
                "dataset_len": self.dataset_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``, also when it was saved with another split of the same global
        batch (devices × nodes × micro-batch × accumulation): the position is a number of whole
        global batches, and global batch ``b`` holds the same samples under any split."""
        saved_len = state.get("dataset_len", self.dataset_len)
        if saved_len != self.dataset_len:
            raise ValueError(f"sampler state was saved over {saved_len} training samples, "
                             f"resuming over {self.dataset_len}: use the same training data")
        replicas = state.get("num_replicas", self.num_replicas)
        batch = state.get("batch_size", self.batch_size)
        accumulate = state.get("accumulate", self.accumulate)
        saved_global = replicas * batch * accumulate
        if saved_global != self.global_batch:
            raise ValueError(
                f"sampler state was saved with a global batch of {saved_global} ({replicas} "
                f"ranks x {batch} x {accumulate} accumulation), resuming with "
                f"{self.global_batch}: exact resume needs the same loader.global_batch_size")
        per_rank_step = batch * accumulate  # this rank's samples per global batch, then
        if state["consumed"] % per_rank_step:
            raise ValueError(f"consumed={state['consumed']} is not a whole number of global "
                             "batches: the checkpoint was not written at an optimizer step")
        consumed = state["consumed"] // per_rank_step * self.batch_size * self.accumulate
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"consumed={state['consumed']} outside the epoch: the checkpoint "
                             "belongs to a different dataset or batch setup")
        if (replicas, batch, accumulate) != (self.num_replicas, self.batch_size, self.accumulate):
            log.info("resuming a run saved with %d ranks x %d x %d accumulation on %d ranks x "
                     "%d x %d accumulation: same global batch, continuing at global batch %d",
                     replicas, batch, accumulate, self.num_replicas, self.batch_size,
                     self.accumulate, consumed // (self.batch_size * self.accumulate))
            if batch != self.batch_size:
                log.warning("loader.batch_size changed (%d -> %d): each global batch holds the "
                            "same samples, but the noise and time draws are keyed by "
                            "micro-batch slot, so they differ from the original run", batch,
                            self.batch_size)
        self.epoch = state["epoch"]
        self.consumed = consumed
