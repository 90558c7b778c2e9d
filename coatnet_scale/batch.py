"""The batch a worker group of a given size runs (the lowest layer: plain arithmetic).

`train.global_batch_size` is what a run keeps; `train.micro_batch_size` is the most one worker
takes in one pass. At any worker count the configured global batch is kept exactly when some
micro-batch no larger than the configured one and a whole number of accumulation steps make it
(4096 on 256 workers: 16 x 1; on 128: 32 x 1, or 16 x 2 when the micro-batch is 16). Otherwise
the nearest attainable batch within `train.elastic_batch_tolerance` is used, with the learning
rate scaled linearly (4096 on 255 workers: 16 x 255 = 4080, 0.4% off); beyond it the worker
count is refused, naming counts that would work. DeepSpeed's `elasticity` config solves the
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
    """How `world_size` workers make (or come nearest to) `train.global_batch_size`."""
    wanted, largest_micro = train.global_batch_size, train.micro_batch_size
    per_worker = wanted // world_size if wanted % world_size == 0 else max(1, round(wanted / world_size))
    attained = per_worker * world_size
    if attained != wanted and abs(attained - wanted) / wanted > train.elastic_batch_tolerance:
        fits = [n for n in range(max_workers, min_workers - 1, -1) if wanted % n == 0]
        raise ElasticBatchError(
            f"train.global_batch_size={wanted} cannot be made by {world_size} workers (the nearest is {attained}, "
            f"{abs(attained - wanted) / wanted:.2%} off); worker counts that make it: "
            f"{', '.join(map(str, fits[:12])) or 'none in range'}; or allow the difference with "
            f"train.elastic_batch_tolerance")
    micro = max(d for d in range(1, min(largest_micro, per_worker) + 1) if per_worker % d == 0)
    return BatchPlan(world_size, micro, per_worker // micro, attained, attained / wanted)


def apply_batch_plan(config, plan: BatchPlan):
    """The config as the worker group runs it: batch, accumulation, learning rates, group size."""
    t = config.train
    train = t.model_copy(update={
        "micro_batch_size": plan.micro_batch_size, "grad_accum_steps": plan.grad_accum_steps,
        "global_batch_size": plan.global_batch_size, "lr": t.lr * plan.lr_scale, "min_lr": t.min_lr * plan.lr_scale,
    })
    cluster = config.cluster.model_copy(update={"num_workers": plan.world_size})
    return config.model_copy(update={"train": train, "cluster": cluster})
