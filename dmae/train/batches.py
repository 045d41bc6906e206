"""Optimizer steps split into micro-batches across accumulation steps and processes.

Step s of an epoch takes the global batch perm[s*G:(s+1)*G] of a permutation seeded by (seed, epoch). Process r
of w, on accumulation micro-step k of a, takes positions [(k*w + r)*m, (k*w + r + 1)*m) of that global batch,
m = G / (a*w). Every random draw of a sample is keyed by (seed, epoch, step, position), so the same global batch
sees the same corruption whatever a and w are; a random augmentation of a sample is keyed by (seed, epoch, dataset
index), so it does not depend on a, w or the number of data-loader workers either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from dmae.data.loading import TensorSplit
from dmae.util import distributed as dist
from dmae.util.seeding import derive_seed, seeded_globally


@dataclass(frozen=True)
class MicroBatch:
    epoch: int
    step: int  # optimizer step within the epoch
    x: torch.Tensor
    y: torch.Tensor
    positions: range  # positions of these samples in the step's global batch
    last: bool  # the micro-step that ends the optimizer step

    def to(self, device: torch.device) -> "MicroBatch":
        return dataclasses.replace(self, x=self.x.to(device, non_blocking=True),
                                   y=self.y.to(device, non_blocking=True))


def micro_batch_size(batch_size: int, accum_steps: int, key: str) -> int:
    """Per-process micro-batch; the global batch must split evenly over accumulation steps and processes."""
    parts = accum_steps * dist.world_size()
    if batch_size % parts:
        raise ValueError(f"{key}.batch_size {batch_size} does not split into {accum_steps} accumulation steps x "
                         f"{dist.world_size()} processes")
    return batch_size // parts


def epoch_batches(dataset: Dataset, batch_size: int, accum_steps: int, seed: int, epoch: int, workers: int,
                  key: str = "train") -> Iterator[MicroBatch]:
    """This process's micro-batches of one epoch, in order; the incomplete last global batch is dropped."""
    world, rank = dist.world_size(), dist.rank()
    micro = micro_batch_size(batch_size, accum_steps, key)
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(derive_seed(seed, epoch, "order")))
    perm = perm.tolist()
    order = []
    for s in range(len(dataset) // batch_size):
        for k in range(accum_steps):
            start = s * batch_size + (k * world + rank) * micro
            order += perm[start:start + micro]
    if isinstance(dataset, TensorSplit) and dataset.transform is None:  # in memory, nothing drawn: slice it
        loader = (dataset.items(order[i:i + micro]) for i in range(0, len(order), micro))
    else:
        keyed = [(i, derive_seed(seed, epoch, "augment", i)) for i in order]
        loader = DataLoader(KeyedAugmentation(dataset), batch_size=micro, sampler=keyed, num_workers=workers)
    for i, (x, y) in enumerate(loader):
        step, k = divmod(i, accum_steps)
        start = (k * world + rank) * micro
        yield MicroBatch(epoch, step, x, y, range(start, start + micro), k == accum_steps - 1)


class KeyedAugmentation(Dataset):
    """`dataset[i]` with every global RNG seeded from a key for that one item (and restored afterwards), so a
    random augmentation draws the same for a sample whether it is loaded in this process or in any data-loader
    worker, and in a resumed run."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, key = item
        with seeded_globally(key):
            return self.dataset[index]


def steps_per_epoch(dataset: Dataset, batch_size: int, key: str) -> int:
    steps = len(dataset) // batch_size
    if steps < 1:
        raise ValueError(f"{key}.batch_size {batch_size} exceeds the {len(dataset)} training images")
    return steps
