"""An exponential moving average of the weights that stays partitioned under ZeRO-3.

Each rank averages only its own partition of every parameter (`param.ds_tensor`), in fp32,
so no process ever holds the whole model, and the EMA costs 4 bytes per parameter divided by
the world size. BatchNorm statistics, which every rank holds whole, are averaged too.
`applied()` swaps the averages into the partitions for an evaluation and swaps them back;
`state_dict()` goes into each rank's trainer_state file, and engine/consolidate.py
rebuilds whole tensors from those files exactly as it does for the raw weights.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _partition(param: nn.Parameter) -> torch.Tensor:
    """This rank's share of `param`: its ZeRO-3 partition, or the whole tensor without ZeRO-3."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class ShardedEMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = dict(model.named_parameters())
        self.buffers = {n: b for n, b in model.named_buffers() if b.is_floating_point()}
        self.shadow = {n: _partition(p).detach().float().clone() for n, p in self.params.items()}
        self.shadow_buffers = {n: b.detach().float().clone() for n, b in self.buffers.items()}

    @torch.no_grad()
    def update(self) -> None:
        """After each optimizer step."""
        for name, param in self.params.items():
            self.shadow[name].lerp_(_partition(param).float(), 1 - self.decay)
        for name, buffer in self.buffers.items():
            self.shadow_buffers[name].lerp_(buffer.float(), 1 - self.decay)

    @contextmanager
    def applied(self):
        """Within the block the model computes with the EMA weights."""
        saved = {n: _partition(p).detach().clone() for n, p in self.params.items()}
        saved_buffers = {n: b.detach().clone() for n, b in self.buffers.items()}
        self._load(self.shadow, self.shadow_buffers)
        try:
            yield
        finally:
            self._load(saved, saved_buffers)

    @torch.no_grad()
    def _load(self, params: dict, buffers: dict) -> None:
        # ZeRO-3 keeps some parameters gathered between steps (small "persistent" ones, and any
        # left gathered by the last forward or a checkpoint save). Release exactly those, write
        # the partitions, then gather them again, as DeepSpeed does when it loads a checkpoint;
        # the others are gathered from the new partitions by the next forward.
        gathered = [p for p in self.params.values() if getattr(getattr(p, "ds_status", None), "name", "") == "AVAILABLE"]
        if gathered:
            gathered[0].partition(param_list=gathered)
        for name, param in self.params.items():
            _partition(param).copy_(params[name])
        for name, buffer in self.buffers.items():
            buffer.copy_(buffers[name])
        if gathered:
            gathered[0].all_gather(param_list=gathered)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "params": {n: t.cpu() for n, t in self.shadow.items()},
                "buffers": {n: t.cpu() for n, t in self.shadow_buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        for target, source in ((self.shadow, state["params"]), (self.shadow_buffers, state["buffers"])):
            if set(target) != set(source):
                raise ValueError("EMA state does not match the model's parameters")
            for name, value in source.items():
                target[name].copy_(value)
