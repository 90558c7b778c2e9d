"""The tensor collectives the engine calls itself (DeepSpeed's own are DeepSpeed's), behind one
guard: a tensor must be on the device the training runs on.

NCCL moves CUDA tensors only; a CPU tensor handed to it raises at run time, and only on the
GPU path, which CPU runs never take. Here every collective checks its tensor against the device
`bind` named (the worker's training device), and names the mistake. `audit(device)` checks
without communicating, against a device a CPU machine cannot compute on (meta stands in for
cuda), so a CPU test finds a tensor built without `device=` as a GPU run would.
Object collectives (`all_gather_object`, `broadcast_object_list`) pick their device from the
backend themselves and need no guard.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

_device: torch.device | None = None
_communicate = True


def bind(device: torch.device) -> None:
    global _device
    _device = torch.device(device)


@contextmanager
def audit(device: torch.device):
    """Within the block, collectives only check that tensors are on `device`."""
    global _device, _communicate
    saved = _device, _communicate
    _device, _communicate = torch.device(device), False
    try:
        yield
    finally:
        _device, _communicate = saved


def device() -> torch.device:
    """Where tensors for a collective must be: the bound device, else what the backend needs."""
    if _device is not None:
        return _device
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _check(tensor: torch.Tensor, operation: str) -> None:
    expected = device()
    same = tensor.device.type == expected.type and expected.index in (None, tensor.device.index)
    if not same:
        raise RuntimeError(f"{operation}: tensor on {tensor.device}, but collectives run on {expected}; "
                           f"create it with device= the training device")


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns the tensor."""
    _check(tensor, "all_reduce")
    if _communicate:
        dist.all_reduce(tensor)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    _check(tensor, "broadcast")
    if _communicate:
        dist.broadcast(tensor, src=src)
    return tensor


def smallest(value: float) -> float:
    """The least of every rank's `value`, on every rank (a min all-reduce)."""
    if not _communicate:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor.item()
