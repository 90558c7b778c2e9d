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

A group that changes size mid-epoch (an elastic resize) continues the epoch in a new phase:
each earlier `Phase` records a group's size, its DataLoader workers, batch size and the
batches each rank had consumed. Which samples those were follows from the plan (a worker's
consumed batches are the first outputs of its shuffle buffer, `shuffled`); the rest of the
epoch, in epoch order, is cut into the new group's slots as above. So every sample of the
epoch is still read exactly once, and the same phases always give the same plan.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Iterator
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


def shard_order(shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order an exact epoch reads the shards in."""
    order = list(range(shards))
    if shuffle:
        random.Random(derive_seed(seed, epoch)).shuffle(order)
    return order


def exact_plan(
    shard_sizes: list[int], seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int,
    batch_size: int, shuffle: bool = True,
) -> SlotPlan:
    order = shard_order(len(shard_sizes), seed, epoch, shuffle)
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
    batch_size: int, epoch_samples: int, phase: int = 0,
) -> SlotPlan:
    """`phase` > 0: the rest of a resized epoch, `epoch_samples` being what is left of it."""
    slots = world_size * num_workers
    slot = rank * num_workers + worker
    start, end = balanced_ranges(epoch_samples, slots)[slot]
    rng = random.Random(derive_seed(seed, epoch, slot, 1, *((phase,) if phase else ())))
    segments, remaining = [], end - start
    while remaining > 0:
        shard = rng.randrange(len(shard_sizes))
        take = min(remaining, shard_sizes[shard])
        segments.append(Segment(shard, 0, take))
        remaining -= take
    batches = batches_per_slot(epoch_samples, slots, batch_size)
    return SlotPlan(segments, slot_batch_sizes(end - start, batches, batch_size))


# ---------------------------------------------------------------------------------------
# Shuffling, and epochs that change group size midway


def shuffled(items: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: the order depends only on the number of items and the rng."""
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


@dataclass(frozen=True)
class Phase:
    """Part of an epoch read by a group before it changed size."""

    world_size: int
    num_workers: int  # DataLoader workers per rank (0 counts as 1)
    batch_size: int
    batches: int  # batches each rank had consumed


@dataclass(frozen=True)
class EpochSpec:
    """What fixes an epoch's plan besides the group: the data, the order and the mode."""

    shard_sizes: tuple[int, ...]
    seed: int
    epoch: int
    shuffle: bool = True
    shuffle_buffer: int = 1000
    mode: str = "exact"
    epoch_samples: int | None = None


def shuffle_seed(spec: EpochSpec, rank: int, worker: int, phase: int) -> int:
    """The seed of a worker's shuffle buffer (phase 0 keeps the seed an unresized epoch uses)."""
    return derive_seed(spec.seed, spec.epoch, rank, worker, 2, *((phase,) if phase else ()))


def phase_plan(spec: EpochSpec, phases: tuple[Phase, ...], rank: int, world_size: int, worker: int,
               num_workers: int, batch_size: int) -> SlotPlan:
    """The slot of (rank, worker) in the phase after `phases` (none: an ordinary epoch)."""
    args = (list(spec.shard_sizes), spec.seed, spec.epoch, rank, world_size, worker, num_workers, batch_size)
    if spec.mode != "exact":  # resampled: after a resize, only the count of what is left matters
        return resampled_plan(*args, samples_left(spec, phases), phase=len(phases))
    if not phases:
        return exact_plan(*args, shuffle=spec.shuffle)
    slots = world_size * num_workers
    left = remaining_positions(spec, phases)
    start, end = balanced_ranges(len(left), slots)[rank * num_workers + worker]
    batches = batches_per_slot(len(left), slots, batch_size)
    return SlotPlan(_segments(spec, left[start:end]), slot_batch_sizes(end - start, batches, batch_size))


def samples_left(spec: EpochSpec, phases: tuple[Phase, ...]) -> int:
    """How many samples of the epoch the phases left unread."""
    if spec.mode != "exact":
        return spec.epoch_samples - sum(len(c) for c in _consumed(spec, phases))
    return len(remaining_positions(spec, phases))


def remaining_positions(spec: EpochSpec, phases: tuple[Phase, ...]) -> np.ndarray:
    """Epoch positions (indices into the epoch's sample sequence) no earlier phase consumed, in order."""
    taken = np.zeros(sum(spec.shard_sizes), dtype=bool)
    for consumed in _consumed(spec, phases):
        taken[consumed] = True
    return np.flatnonzero(~taken)


@functools.lru_cache(maxsize=8)
def _consumed(spec: EpochSpec, phases: tuple[Phase, ...]) -> tuple[np.ndarray, ...]:
    """Per earlier phase and slot, the epoch positions its consumed batches held. Cached: every
    DataLoader worker forks from a process that has computed it already."""
    result = []
    for index, phase in enumerate(phases):
        workers = max(1, phase.num_workers)
        for rank in range(phase.world_size):
            for worker in range(workers):
                plan = phase_plan(spec, phases[:index], rank, phase.world_size, worker, workers, phase.batch_size)
                count = sum(plan.batch_sizes[: len(range(worker, phase.batches, workers))])
                positions = _positions(spec, plan.segments)
                if spec.shuffle:
                    positions = shuffled(positions, spec.shuffle_buffer, random.Random(shuffle_seed(spec, rank, worker, index)))
                result.append(np.fromiter((p for _, p in zip(range(count), positions)), dtype=np.int64, count=count))
    return tuple(result)


def _order_starts(spec: EpochSpec) -> tuple[list[int], np.ndarray]:
    """The epoch's shard order and where each of them starts in the epoch sequence."""
    order = shard_order(len(spec.shard_sizes), spec.seed, spec.epoch, spec.shuffle)
    starts = np.concatenate([[0], np.cumsum([spec.shard_sizes[s] for s in order])])
    return order, starts


def _positions(spec: EpochSpec, segments: list[Segment]) -> Iterator[int]:
    order, starts = _order_starts(spec)
    where = {shard: int(starts[i]) for i, shard in enumerate(order)}
    for segment in segments:
        yield from range(where[segment.shard] + segment.skip, where[segment.shard] + segment.skip + segment.take)


def _segments(spec: EpochSpec, positions: np.ndarray) -> list[Segment]:
    """Runs of consecutive positions within one shard, as segments."""
    order, starts = _order_starts(spec)
    segments: list[Segment] = []
    if len(positions) == 0:
        return segments
    shard_of = np.searchsorted(starts, positions, side="right") - 1
    breaks = np.flatnonzero((np.diff(positions) != 1) | (np.diff(shard_of) != 0)) + 1
    for run in np.split(np.arange(len(positions)), breaks):
        first, index = int(positions[run[0]]), int(shard_of[run[0]])
        segments.append(Segment(order[index], first - int(starts[index]), len(run)))
    return segments
