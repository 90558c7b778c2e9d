"""`model.checkpointing: auto`: which blocks to checkpoint so a training step fits in memory.

Each block is scored by what checkpointing it frees per FLOP it recomputes: the activation
bytes it saves for backward, less its input (which a checkpointed block keeps), over its
forward FLOPs, both per image, counted on the meta device. The planner (coatnet_scale.plan)
then takes the fewest blocks, best score first, whose predicted step peak fits: it measures
the peak of a candidate by replaying the step (`peak`) and steers the count by what the blocks
free, so a choice takes a few replays, not one per block.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from coatnet_scale.models import Checkpointing, create_model
from coatnet_scale.models.coatnet import CoAtNetSpec


@dataclass(frozen=True)
class BlockCost:
    freed: int  # activation bytes per image checkpointing the block frees
    flops: int  # forward FLOPs per image it recomputes


@functools.lru_cache(maxsize=16)
def block_costs(model_name: str, image_size: int, num_classes: int = 1000, element_bytes: int = 2) -> tuple[BlockCost, ...]:
    """Per block of the model (in order), what checkpointing it frees and costs, per image."""
    with torch.device("meta"):
        model = create_model(model_name, num_classes, image_size).train()
    blocks = [block for stage in model.stages for block in stage]
    states = {id(t.untyped_storage()) for t in [*model.parameters(), *model.buffers()]}
    saved: list[dict[int, int]] = [{} for _ in blocks]
    inputs = [0] * len(blocks)
    current = [None]

    def size(t: torch.Tensor) -> int:
        nbytes = t.untyped_storage().nbytes()
        return nbytes // t.element_size() * element_bytes if t.is_floating_point() else nbytes

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = id(t.untyped_storage())
        if current[0] is not None and key not in states:
            saved[current[0]][key] = size(t)
        return t

    def enter(index: int):
        def hook(module, args):
            current[0] = index
            inputs[index] = size(args[0])
        return hook

    handles = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(lambda *_: current.__setitem__(0, None)) for b in blocks]
    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    for handle in handles:
        handle.remove()
    flops = counter.get_flop_counts()
    names = [f"CoAtNet.stages.{s}.{i}" for s, stage in enumerate(model.stages) for i in range(len(stage))]
    return tuple(BlockCost(max(0, sum(saved[b].values()) - inputs[b]), sum(flops.get(names[b], {}).values()))
                 for b in range(len(blocks)))


@functools.lru_cache(maxsize=16)
def stem_and_head_flops(model_name: str, image_size: int, num_classes: int = 1000) -> tuple[int, int]:
    """Forward FLOPs per image of the stem and of the head (final norm, pre-logits, classifier),
    by the same count as `block_costs`: with the blocks', the model's `count_flops`."""
    with torch.device("meta"):
        model = create_model(model_name, num_classes, image_size).train()
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    head = sum(flops.get(f"CoAtNet.{part}", 0) for part in ("norm", "pre_logits", "head"))
    return flops.get("CoAtNet.stem", 0), head


def choose_blocks(costs: tuple[BlockCost, ...], micro_batch: int, peak: Callable[[Checkpointing], int],
                  budget: float) -> tuple[tuple[int, ...], int] | None:
    """The fewest blocks, most bytes freed per recomputed FLOP first, whose step peak
    (`peak(policy)`, activation bytes at the micro-batch) is within `budget`, and that peak;
    None when even every block checkpointed does not fit.

    The search interpolates: between the largest count known not to fit and the smallest
    known (or, before any is, guessed) to fit, the peak falls with the bytes the blocks free
    (measured: within a block's worth for CoAtNet-7 down to about a third of the peak without
    checkpointing; below that the recomputation of the largest block flattens it), so the
    next count tried is where that line meets the budget; after three tries, halving."""
    n = len(costs)
    order = sorted(range(n), key=lambda b: -costs[b].freed / max(1, costs[b].flops))
    freed = [0]
    for b in order:
        freed.append(freed[-1] + costs[b].freed * micro_batch)

    def policy(k: int) -> Checkpointing:
        return Checkpointing(blocks=tuple(sorted(order[:k])))

    lo, lo_peak = 0, peak(policy(0))  # lo: the most blocks known not to fit
    if lo_peak <= budget:
        return (), lo_peak
    hi, hi_peak, hi_known = n, lo_peak - freed[n], False  # hi: the fewest known (or guessed) to fit
    tries = 0
    while not (hi_known and hi - lo == 1):
        slope = (lo_peak - hi_peak) / max(1, freed[hi] - freed[lo])
        k = next((k for k in range(lo + 1, hi + 1) if lo_peak - (freed[k] - freed[lo]) * slope <= budget), hi)
        if tries >= 3:
            k = (lo + hi + 1) // 2
        if hi_known and k == hi:
            k = hi - 1
        tries += 1
        measured = peak(policy(k))
        if measured <= budget:
            hi, hi_peak, hi_known = k, measured, True
        elif k == n:
            return None
        else:
            lo, lo_peak = k, measured
    return policy(hi).blocks, hi_peak


def describe_blocks(spec: CoAtNetSpec, blocks: tuple[int, ...]) -> str:
    """Blocks by stage, e.g. 'S2 MBConv 0-11, S3 Transformer 0,2' (indices within the stage)."""
    parts, start = [], 0
    for stage in spec.stages:
        mine = [b - start for b in blocks if start <= b < start + stage.depth]
        start += stage.depth
        if not mine:
            continue
        runs, first = [], mine[0]
        for i, b in enumerate(mine):
            if i + 1 == len(mine) or mine[i + 1] != b + 1:
                runs.append(f"{first}-{b}" if b > first else f"{b}")
                if i + 1 < len(mine):
                    first = mine[i + 1]
        kind = "MBConv" if stage.kind == "mbconv" else "Transformer"
        parts.append(f"S{stage.paper_stage} {kind} {','.join(runs)}" + (" (all)" if len(mine) == stage.depth else ""))
    return ", ".join(parts) or "none"
