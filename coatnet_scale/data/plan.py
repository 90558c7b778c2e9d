"""Which samples each (rank, DataLoader worker) reads in an epoch: pure arithmetic on the manifest.

Exact mode. The epoch's shard order is a permutation seeded by (seed, epoch); concatenated, the
shards form one sequence of N samples. It is cut into world_size x num_workers contiguous
"slots" whose sizes differ by at most one sample; slot (rank r, worker w) is number
r * num_workers + w. Every slot is cut into the same number K of batches: K - 1 batches of
`batch_size` and a last one of 1 to batch_size + 1 samples. So every sample is read exactly
once per epoch, and every rank yields exactly num_workers * K batches, whatever the shard
count and sizes.

Resampled mode (corpora far larger than one pass): each slot draws shards at random, with
replacement, seeded by (seed, epoch, slot), until it has read its share of `epoch_samples`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers, well mixed (seed, epoch, rank, ... never collide)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@dataclass(frozen=True)
class Segment:
    shard: int  # index into the manifest's shard list
    skip: int  # samples to pass over at the start of the shard
    take: int  # samples to read after that


@dataclass(frozen=True)
class SlotPlan:
    segments: list[Segment]
    batch_sizes: list[int]


def balanced_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous [start, end) ranges covering range(total), sizes differing by <= 1."""
    base, extra = divmod(total, parts)
    ranges, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def batches_per_slot(total: int, slots: int, batch_size: int) -> int:
    smallest = total // slots
    if smallest == 0:
        raise ValueError(f"{total} samples cannot give each of {slots} (rank, worker) slots one sample")
    return -(-smallest // batch_size)


def slot_batch_sizes(slot_samples: int, batches: int, batch_size: int) -> list[int]:
    sizes = [batch_size] * (batches - 1)
    last = slot_samples - batch_size * (batches - 1)
    assert 1 <= last <= batch_size + 1, (slot_samples, batches, batch_size)
    return sizes + [last]


def exact_plan(
    shard_sizes: list[int], seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int,
    batch_size: int, shuffle: bool = True,
) -> SlotPlan:
    order = list(range(len(shard_sizes)))
    if shuffle:
        random.Random(derive_seed(seed, epoch)).shuffle(order)
    total = sum(shard_sizes)
    slots = world_size * num_workers
    start, end = balanced_ranges(total, slots)[rank * num_workers + worker]
    segments, position = [], 0
    for shard in order:
        size = shard_sizes[shard]
        lo, hi = max(start, position), min(end, position + size)
        if lo < hi:
            segments.append(Segment(shard, lo - position, hi - lo))
        position += size
    batches = batches_per_slot(total, slots, batch_size)
    return SlotPlan(segments, slot_batch_sizes(end - start, batches, batch_size))


def resampled_plan(
    shard_sizes: list[int], seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int,
    batch_size: int, epoch_samples: int,
) -> SlotPlan:
    slots = world_size * num_workers
    slot = rank * num_workers + worker
    start, end = balanced_ranges(epoch_samples, slots)[slot]
    rng = random.Random(derive_seed(seed, epoch, slot, 1))
    segments, remaining = [], end - start
    while remaining > 0:
        shard = rng.randrange(len(shard_sizes))
        take = min(remaining, shard_sizes[shard])
        segments.append(Segment(shard, 0, take))
        remaining -= take
    batches = batches_per_slot(epoch_samples, slots, batch_size)
    return SlotPlan(segments, slot_batch_sizes(end - start, batches, batch_size))
