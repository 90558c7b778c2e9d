"""The batch a worker group of a given size runs (the lowest layer: plain arithmetic).

`train.global_batch_size` is what a run keeps; `train.micro_batch_size` is the most one worker
takes in one pass, and half of it the least (`train.elastic_min_micro_batch`). At any worker
count the configured global batch is kept exactly when such a micro-batch and a whole number
of accumulation steps make it (4096 on 256 workers: 16 x 1; on 128: 32 x 1, or 16 x 2 when the
micro-batch is 16). Otherwise the nearest attainable batch within
`train.elastic_batch_tolerance` (default 7%) is used, with the learning rate scaled linearly
(4096 on 255 workers: 16 x 1 x 255 = 4080, 0.4% off; on 240: 9 x 2 x 240 = 4320, 5.5% off);
beyond it the worker count is refused, naming counts that would work. DeepSpeed's `elasticity` config solves the
same problem ahead of time, for a list of micro-batches; here the group's size decides.
"""
from __future__ import annotations

from dataclasses import dataclass


class ElasticBatchError(ValueError):
    """No batch within tolerance at this worker count."""


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    lr_scale: float  # global batch / configured global batch; the learning rate scales alike

    def describe(self, configured: int) -> str:
        text = (f"{self.world_size} workers x micro-batch {self.micro_batch_size} x {self.grad_accum_steps} "
                f"accumulation = global batch {self.global_batch_size}")
        if self.global_batch_size != configured:
            text += f" (configured {configured}; learning rate x {self.lr_scale:.4f})"
        return text


def batch_plan(train, world_size: int, max_workers: int, min_workers: int = 1) -> BatchPlan:
    """How `world_size` workers make (or come nearest to) `train.global_batch_size`.

    The micro-batch is chosen first, then the accumulation: under ZeRO-3 every micro-step
    gathers every parameter, and BatchNorm normalises over the micro-batch, so a group never
    runs micro-batch 1 x 17 steps to hit a number. Candidates are every micro-batch from the
    configured one down to `train.elastic_min_micro_batch` (default: half the configured one),
    each with the whole numbers of steps around the batch, and, where the per-worker batch is
    small, that batch in one pass. The nearest to the configured global batch wins, the larger
    micro-batch on a tie; beyond `train.elastic_batch_tolerance` the count is refused."""
    wanted = train.global_batch_size
    micro, steps, smallest = _nearest(train, world_size)
    attained = world_size * micro * steps
    if attained != wanted and abs(attained - wanted) / wanted > train.elastic_batch_tolerance:
        fits = [n for n in range(max_workers, min_workers - 1, -1) if _nearest_batch(train, n) == wanted]
        raise ElasticBatchError(
            f"train.global_batch_size={wanted} cannot be made by {world_size} workers with micro-batches of "
            f"{smallest}..{train.micro_batch_size} (the nearest is {attained}, {abs(attained - wanted) / wanted:.2%} "
            f"off); worker counts that make it: {', '.join(map(str, fits[:12])) or 'none in range'}; or allow the "
            f"difference with train.elastic_batch_tolerance, or smaller micro-batches with train.elastic_min_micro_batch")
    return BatchPlan(world_size, micro, steps, attained, attained / wanted)


def _nearest(train, world_size: int) -> tuple[int, int, int]:
    """(micro-batch, accumulation, smallest micro-batch allowed) nearest the global batch."""
    wanted, largest = train.global_batch_size, train.micro_batch_size
    smallest = min(largest, train.elastic_min_micro_batch or (largest + 1) // 2)
    candidates = {(micro, steps) for micro in range(smallest, largest + 1)
                  for steps in {max(1, wanted // (world_size * micro)), -(-wanted // (world_size * micro))}}
    # A per-worker batch below the smallest micro-batch: all of it in one pass.
    candidates |= {(per_worker, 1) for per_worker in (wanted // world_size, -(-wanted // world_size))
                   if 1 <= per_worker <= largest}
    micro, steps = min(candidates, key=lambda c: (abs(world_size * c[0] * c[1] - wanted), -c[0], c[1]))
    return micro, steps, smallest


def _nearest_batch(train, world_size: int) -> int:
    micro, steps, _ = _nearest(train, world_size)
    return world_size * micro * steps


def describe_sizes(train, min_workers: int, max_workers: int) -> list[str]:
    """What each group size from max_workers down to min_workers runs, consecutive sizes with
    the same micro-batch and accumulation on one line; sizes that cannot run say so."""
    rows: list[list] = []  # [first size, last size, what it runs, global batches]
    for size in range(max_workers, min_workers - 1, -1):
        try:
            plan = batch_plan(train, size, max_workers, min_workers)
            what, batch = f"micro-batch {plan.micro_batch_size} x {plan.grad_accum_steps}", plan.global_batch_size
        except ElasticBatchError:
            what, batch = "cannot make the batch", None
        if rows and rows[-1][2] == what:
            rows[-1][1] = size
            rows[-1][3].append(batch)
        else:
            rows.append([size, size, what, [batch]])
    lines = []
    for first, last, what, batches in rows:
        sizes = f"{first}" if first == last else f"{first}..{last}"
        if batches[0] is None:
            lines.append(f"{sizes} workers: {what}")
        else:
            low, high = min(batches), max(batches)
            lines.append(f"{sizes} workers: {what} = global {low if low == high else f'{low}..{high}'}")
    return lines


def apply_batch_plan(config, plan: BatchPlan):
    """The config as the worker group runs it: batch, accumulation, learning rates, group size."""
    t = config.train
    train = t.model_copy(update={
        "micro_batch_size": plan.micro_batch_size, "grad_accum_steps": plan.grad_accum_steps,
        "global_batch_size": plan.global_batch_size, "lr": t.lr * plan.lr_scale, "min_lr": t.min_lr * plan.lr_scale,
    })
    cluster = config.cluster.model_copy(update={"num_workers": plan.world_size})
    return config.model_copy(update={"train": train, "cluster": cluster})
