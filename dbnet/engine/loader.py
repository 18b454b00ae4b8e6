"""The training data order: epoch-seeded shards, resumable mid-epoch, epoch-aware workers.

The batches of an epoch depend only on (seed, epoch, rank, world size), and the dataset
draws every augmentation from (seed, epoch, index), so any number of workers, and a run
resumed in the middle of an epoch, see exactly the same samples.
"""

from __future__ import annotations

import random
import signal
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from dbnet.config import Config
from dbnet.data.dataset import collate
from dbnet.engine.distributed import ProcessInfo
from dbnet.errors import DBNetError


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` pairs: this process's shuffled shard of an epoch.

    The shard comes from DistributedSampler (shuffled with ``seed + epoch``, tail dropped so
    every process gets as many samples), so the order depends only on the seed, the epoch,
    the rank and the world size. Batches already consumed can be skipped without loading
    them, and the epoch travels with each index to the dataset copies in the workers.

    Args:
        size: Number of samples in the dataset.
        batch_size: Samples per batch on this process.
        seed: Shuffling seed.
        rank: This process's rank.
        world_size: Number of processes.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.shard = DistributedSampler(
            range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch to iterate and the number of its batches to skip."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return len(self.shard) // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        self.shard.set_epoch(self.epoch)
        indices = list(self.shard)
        for batch in range(self.start_batch, len(self)):
            chunk = indices[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield [(self.epoch, index) for index in chunk]


class EpochView(Dataset):
    """Reads ``(epoch, index)`` keys: sets the dataset's epoch, then returns its item.

    Persistent workers hold their own copy of the dataset, so an epoch set on the main
    process's copy would never reach them; the epoch in the key does. For the same reason
    each item carries what the dataset skipped or ignored while making it (key ``_report``),
    and a data error travels back as a value (key ``_error``) rather than as a worker
    traceback.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        if epoch != self.epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.epoch = epoch

        skipped = getattr(self.dataset, "skipped", [])
        ignored = getattr(self.dataset, "ignored", Counter())
        skipped_before, ignored_before = len(skipped), Counter(ignored)
        try:
            item = self.dataset[index]
        except DBNetError as exc:
            return {"_error": str(exc)}
        item["_report"] = (skipped[skipped_before:], ignored - ignored_before)
        return item


def collate_with_reports(items: list[dict[str, Any]]) -> dict[str, Any]:
    """`collate` for EpochView items, reports kept aside (runs in the loader workers).

    A data error becomes the batch ``{"_error": message}``, raised by the main process.
    """
    for item in items:
        if "_error" in item:
            return {"_error": item["_error"]}
    reports = [item.pop("_report") for item in items]
    batch = collate(items)
    batch["_reports"] = reports
    return batch


def seed_worker(worker_id: int) -> None:
    """Seeds numpy and python in a loader worker; leaves Ctrl-C to the main process."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    # The main process finishes its step and saves; a worker killed by SIGINT would make the
    # loader raise before that.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(
    dataset: Dataset, config: Config, process: ProcessInfo, device: torch.device
) -> tuple[DataLoader, EpochBatchSampler]:
    """The training loader and its batch sampler (call its set_epoch before each epoch)."""
    train = config.train
    sampler = EpochBatchSampler(
        len(dataset), train.batch_size, train.seed, process.rank, process.world_size
    )
    workers = train.num_workers
    loader = DataLoader(
        EpochView(dataset),
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_with_reports,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker if workers > 0 else None,
        # A private generator: creating loader iterators leaves the global RNG untouched.
        generator=torch.Generator().manual_seed(train.seed + process.rank),
    )
    return loader, sampler
