"""Bucketed batches: every batch from one bucket, reproducible from (seed, epoch), resumable, sharded.

Each epoch, a generator seeded with ``seed + epoch`` permutes every bucket's samples, cuts them into
batches (the last one filled by wrapping round the bucket, so every batch is full), and shuffles the
batches of all buckets together. The batch list is padded by wrapping to a multiple of ``num_replicas``,
so every process gets the same number of batches; process ``rank`` takes every ``num_replicas``-th batch
from ``rank``. :meth:`BucketBatchSampler.set_epoch` chooses the epoch and how many batches to skip (resume).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from .buckets import Size


@dataclass(frozen=True)
class BucketGroup:
    """The samples (dataset indices, repeats included) trained at one size in one batch size."""

    size: Size
    indices: tuple[int, ...]
    batch_size: int

    @property
    def batches(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, each from one :class:`BucketGroup`; see the module docstring."""

    def __init__(self, groups: Sequence[BucketGroup], *, seed: int, num_replicas: int = 1, rank: int = 0):
        self.groups = [group for group in groups if group.indices]
        if not self.groups:
            raise ValueError("no samples to batch: every bucket is empty")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch, self.skip_batches = 0, 0

    def __len__(self) -> int:
        """Batches per epoch for this process (before skipping)."""
        return math.ceil(sum(group.batches for group in self.groups) / self.num_replicas)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every process's batches of ``epoch`` in global order (padded to a multiple of num_replicas)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        batches = []
        for group in self.groups:
            order = [group.indices[i] for i in torch.randperm(len(group.indices), generator=generator).tolist()]
            padded = (order * math.ceil(group.batches * group.batch_size / len(order)))[
                : group.batches * group.batch_size
            ]
            batches += [padded[b * group.batch_size : (b + 1) * group.batch_size] for b in range(group.batches)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        total = len(self) * self.num_replicas
        return (batches * math.ceil(total / len(batches)))[:total]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        yield from batches[self.rank + self.skip_batches * self.num_replicas :: self.num_replicas]


def format_bucket_table(groups: Sequence[BucketGroup], num_replicas: int = 1) -> str:
    """The start-up log's bucket table: size, images (repeats included), batch size, batches per epoch."""
    rows = [("bucket (w x h)", "images", "batch size", "batches/epoch")]
    for group in sorted(groups, key=lambda g: (g.size, g.batch_size)):
        rows.append(
            (f"{group.size[0]} x {group.size[1]}", str(len(group.indices)), str(group.batch_size), str(group.batches))
        )
    total_batches = sum(group.batches for group in groups)
    rows.append(("total", str(sum(len(g.indices) for g in groups)), "", str(total_batches)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    if num_replicas > 1:
        lines.append(
            f"{num_replicas} processes: {math.ceil(total_batches / num_replicas)} batches per process per epoch"
        )
    return "\n".join(lines)
