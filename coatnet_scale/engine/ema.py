"""An exponential moving average of the weights that stays partitioned under ZeRO-3.

Each rank averages only its own partition of every parameter, in fp32, so no process ever
holds the whole model, and the EMA costs 4 bytes per parameter divided by the world size.
Under ZeRO-3 the average follows the optimizer's fp32 master partition, not the bf16 working
copy: at fine-tune learning rates most updates are below bf16's resolution, and an average of
bf16 weights would move in stairs. The master is a few flat buffers (one per optimizer
sub-group), so one foreach call per step updates everything. Without ZeRO-3's optimizer
(stages 0-2, or a plain model) the average follows the parameters themselves.

BatchNorm statistics, which every rank holds whole, are averaged too. `applied()` swaps the
averages into the working weights for an evaluation and swaps them back; `state_dict()` holds
one fp32 tensor per parameter partition and goes into each rank's trainer_state file, and
engine/consolidate.py rebuilds whole tensors from those files exactly as for the raw weights.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _partition(param: nn.Parameter) -> torch.Tensor:
    """This rank's share of `param`: its ZeRO-3 partition, or the whole tensor without ZeRO-3."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


def _zero3_master(model: nn.Module, optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor], dict] | None:
    """(fp32 master flats, working flats, name -> (flat index, offset, length)) of a DeepSpeed
    ZeRO-3 optimizer, whose flat buffer i holds the partitions of `fp16_groups[i]` in order."""
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    working = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    groups = getattr(optimizer, "fp16_groups", None)
    if not masters or not working or groups is None or any(w is None for w in working):
        return None  # parameters offloaded to NVMe have no flat buffer to average
    names = {id(p): n for n, p in model.named_parameters()}
    layout = {}
    for index, group in enumerate(groups):
        offset = 0
        for param in group:
            length = param.partition_numel()
            layout[names[id(param)]] = (index, offset, length)
            offset += length
    if len(layout) != len(names):
        return None  # a parameter outside the optimizer (frozen): average per parameter instead
    return list(masters), list(working), layout


class ShardedEMA:
    def __init__(self, model: nn.Module, decay: float, optimizer=None):
        self.decay = decay
        self.params = dict(model.named_parameters())
        self.buffers = {n: b for n, b in model.named_buffers() if b.is_floating_point()}
        master = _zero3_master(model, optimizer)
        if master is not None:
            self.sources, self.working, layout = master
            self.flats = [t.detach().float().clone() for t in self.sources]
            self.shadow = {n: self.flats[i].narrow(0, offset, length) for n, (i, offset, length) in layout.items()}
        else:
            self.sources = [_partition(p) for p in self.params.values()]
            self.working = self.sources
            self.flats = [t.detach().float().clone() for t in self.sources]
            self.shadow = dict(zip(self.params, self.flats))
        self.buffer_sources = list(self.buffers.values())
        self.buffer_flats = [b.detach().float().clone() for b in self.buffer_sources]
        self.shadow_buffers = dict(zip(self.buffers, self.buffer_flats))

    @torch.no_grad()
    def update(self) -> None:
        """After each optimizer step."""
        for shadows, sources in ((self.flats, self.sources), (self.buffer_flats, self.buffer_sources)):
            if not shadows:
                continue
            if sources[0].dtype != torch.float32:  # working weights (stages 0-2 under bf16)
                sources = [t.float() for t in sources]
            torch._foreach_lerp_(shadows, sources, 1 - self.decay)

    @contextmanager
    def applied(self):
        """Within the block the model computes with the EMA weights."""
        saved = [t.detach().clone() for t in self.working]
        saved_buffers = [b.detach().clone() for b in self.buffer_sources]
        self._load(self.flats, self.buffer_flats)
        try:
            yield
        finally:
            self._load(saved, saved_buffers)

    @torch.no_grad()
    def _load(self, flats: list[torch.Tensor], buffers: list[torch.Tensor]) -> None:
        # ZeRO-3 keeps some parameters gathered between steps (small "persistent" ones, and any
        # left gathered by the last forward or a checkpoint save). Release exactly those, write
        # the partitions, then gather them again, as DeepSpeed does when it loads a checkpoint;
        # the others are gathered from the new partitions by the next forward.
        gathered = [p for p in self.params.values() if getattr(getattr(p, "ds_status", None), "name", "") == "AVAILABLE"]
        if gathered:
            gathered[0].partition(param_list=gathered)
        for target, source in zip(self.working, flats):
            target.copy_(source)
        for target, source in zip(self.buffer_sources, buffers):
            target.copy_(source)
        if gathered:
            gathered[0].all_gather(param_list=gathered)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "params": {n: t.to("cpu", copy=True) for n, t in self.shadow.items()},
                "buffers": {n: t.to("cpu", copy=True) for n, t in self.shadow_buffers.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for target, source in ((self.shadow, state["params"]), (self.shadow_buffers, state["buffers"])):
            if set(target) != set(source):
                raise ValueError("EMA state does not match the model's parameters")
            for name, value in source.items():
                target[name].copy_(value)
