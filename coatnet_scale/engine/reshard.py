"""Resuming on another number of workers than the checkpoint was written by.

Model and optimizer go through DeepSpeed's universal checkpoint (engine/checkpoint.py converts
once and keeps the result beside the checkpoint); this module holds what is ours:

- the batch at the new size: coatnet_scale/batch.py (`batch_plan`);
- each rank's share of the sharded EMA (`reshard_partitions`), cut by ZeRO-3's own rule (a
  parameter of n elements is split into ceil(n / world) per rank, the last padded), from the
  old ranks that hold pieces of it (`source_ranks`);
- RNG states for ranks the checkpoint has none for: `data.plan.derive_seed(seed, rank, step)`, in the worker.
"""
from __future__ import annotations

import math

import torch


def source_ranks(numels: dict[str, int], old_world_size: int, rank: int, world_size: int) -> list[int]:
    """The ranks of `old_world_size` whose partitions hold some of this rank's at `world_size`,
    the only old files this rank reads: those around its place (old / new of them), and a few
    more where a parameter's parts round differently at the two sizes. For CoAtNet-7 from 256
    ranks to 248, at most 19 of the 256; to 128, at most 8."""
    ranks: set[int] = set()
    for numel in numels.values():
        old, new = math.ceil(numel / old_world_size), math.ceil(numel / world_size)
        start, end = rank * new, min((rank + 1) * new, numel)
        if start < end:
            ranks.update(range(start // old, (end - 1) // old + 1))
    return sorted(ranks)


def reshard_partitions(per_rank: dict[int, dict[str, torch.Tensor]], numels: dict[str, int], old_world_size: int,
                       rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's partition at `world_size` of each tensor held partitioned over
    `old_world_size` ranks (as ZeRO-3 partitions: equal parts, the last padded); `per_rank`
    needs only the `source_ranks`."""
    resharded = {}
    for name, numel in numels.items():
        old, size = math.ceil(numel / old_world_size), math.ceil(numel / world_size)
        start, end = rank * size, min((rank + 1) * size, numel)
        part = torch.zeros(size, dtype=next((shards[name].dtype for shards in per_rank.values()), torch.float32))
        for source in range(start // old, (end - 1) // old + 1) if start < end else ():
            shard = per_rank[source][name].reshape(-1)
            low, high = max(start, source * old), min(end, (source + 1) * old)
            part[low - start: high - start] = shard[low - source * old: high - source * old]
        resharded[name] = part
    return resharded
