"""Resuming on another number of workers than the checkpoint was written by.

Model and optimizer go through DeepSpeed's universal checkpoint (engine/checkpoint.py converts
once and keeps the result beside the checkpoint); this module holds what is ours:

- the batch at the new size: coatnet_scale/batch.py (`batch_plan`);
- each rank's share of the sharded EMA (`reshard_partitions`), cut by ZeRO-3's own rule (a
  parameter of n elements is split into ceil(n / world) per rank, the last padded);
- RNG states for ranks the checkpoint has none for: `data.plan.derive_seed(seed, rank, step)`, in the worker.
"""
from __future__ import annotations

import math

import torch


def reshard_partitions(per_rank: list[dict[str, torch.Tensor]], numels: dict[str, int], rank: int,
                       world_size: int) -> dict[str, torch.Tensor]:
    """This rank's partition at `world_size` of each tensor that `per_rank` holds partitioned
    over len(per_rank) ranks (as ZeRO-3 partitions: equal parts, the last padded)."""
    resharded = {}
    for name, numel in numels.items():
        whole = torch.cat([shards[name].reshape(-1) for shards in per_rank])[:numel]
        size = math.ceil(numel / world_size)
        part = torch.zeros(size, dtype=whole.dtype)
        piece = whole[rank * size: (rank + 1) * size]
        part[: piece.numel()] = piece
        resharded[name] = part
    return resharded
