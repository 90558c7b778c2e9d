"""AdamW parameter groups and the learning-rate schedule (warm-up, then cosine/linear/constant)."""
from __future__ import annotations

import math

from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and conv kernels only: not on norms, biases or the
    relative-position tables. Shapes come from `ds_shape` when ZeRO-3 has partitioned a tensor."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        ndim = len(getattr(param, "ds_shape", param.shape))
        (no_decay if ndim <= 1 or "relative_position_bias_table" in name else decay).append(param)
    return [{"params": params, "weight_decay": wd} for params, wd in zip((decay, no_decay), group_weight_decays(weight_decay))]


def group_weight_decays(weight_decay: float) -> list[float]:
    """Each parameter group's weight decay, in `param_groups`' order."""
    return [weight_decay, 0.0]


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """The factor on the peak lr at `step`: linear warm-up, then decay to min_ratio at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape
