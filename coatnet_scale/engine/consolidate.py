"""Whole-model weights from a ZeRO-3 checkpoint written by any number of workers.

`find_checkpoint(url)` accepts a checkpoint folder (`.../checkpoints/step_000001000`), a run's
checkpoints folder or the run folder itself, and returns the newest complete checkpoint (one
with a valid COMPLETE.json). `consolidate(url, weights="raw"|"ema")` rebuilds every parameter
from the per-rank partitions:

- raw: DeepSpeed's fp32 master partitions (`fp32_flat_groups` in each rank's optim_states
  file). ZeRO-3 pads each parameter to a multiple of the world size and gives rank r the r-th
  slice, parameter after parameter, in the order of `param_shapes`; concatenating the ranks'
  slices and trimming the padding gives the parameter back.
- ema: the EMA partitions each rank keeps in its trainer_state file (engine/ema.py), sliced the
  same way.
BatchNorm statistics are per rank; they are averaged, as evaluation does during training.

Every file is read with `torch.load(weights_only=True)`; DeepSpeed's two non-tensor classes
in optim_states are allow-listed by name, nothing else is unpickled. This is our own
reader, not DeepSpeed's zero_to_fp32, because that one loads with weights_only=False.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from contextlib import contextmanager

import torch
from fsspec.implementations.local import LocalFileSystem

from coatnet_scale.engine.checkpoint import MARKER, Checkpoints, verify_files
from coatnet_scale.storage import url_to_fs


class CheckpointError(RuntimeError):
    """A checkpoint URL that is not a complete checkpoint of this engine."""


def find_checkpoint(url: str, storage_options: dict | None = None, weights: str = "raw") -> tuple[str, dict]:
    """(URL of the newest complete checkpoint at or under `url`, its marker); with weights="ema",
    one whose run kept an EMA."""
    url = url.rstrip("/")
    options = storage_options or {}
    last = url.rsplit("/", 1)[-1]
    if re.fullmatch(r"step_\d+", last):
        folder, tags = url.rsplit("/", 1)[0], [last]
    else:
        folder = url if last == "checkpoints" else f"{url}/checkpoints"
        tags = None
    checkpoints = Checkpoints(folder, options, keep=1, rank=0, world_size=1)
    complete = {tag for _, tag in checkpoints.complete()}
    if tags is None:
        tags = sorted(complete)[-1:]
        if not tags:
            raise CheckpointError(f"{url}: no complete checkpoint (a step_* folder with {MARKER}) under {folder}")
    if tags[0] not in complete:
        raise CheckpointError(f"{url}: not a complete checkpoint (no valid {MARKER}: unfinished or damaged)")
    marker = checkpoints._marker(tags[0])
    if "model" not in marker:
        raise CheckpointError(f"{url}: its {MARKER} does not record the model; it predates fine-tuning support")
    if weights == "ema" and not marker.get("ema"):
        raise CheckpointError(f"{folder}/{tags[0]}: has no EMA weights (train.ema_decay was 0 in that run)")
    return f"{folder}/{tags[0]}", marker


@contextmanager
def _local_copy(url: str, names: list[str], storage_options: dict | None):
    """A local folder holding `names` from the checkpoint at `url` (the folder itself when local)."""
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="coatnet_scale_consolidate_") as folder:
        for name in names:
            fs.get_file(f"{path}/{name}", os.path.join(folder, name))
        yield folder


def _load(path: str) -> dict:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _unshard(shards: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    return torch.cat(shards)[: shape.numel()].view(shape).clone()


def _mean_buffers(model_states: list[dict]) -> dict[str, torch.Tensor]:
    buffers = {}
    for name in model_states[0]["buffer_names"]:
        values = [states["module"][name] for states in model_states]
        buffers[name] = torch.stack([v.float() for v in values]).mean(0) if values[0].is_floating_point() else values[0]
    return buffers


def consolidate(url: str, storage_options: dict | None = None, weights: str = "raw") -> tuple[dict, dict]:
    """(full fp32 state dict, marker) of the newest complete checkpoint at or under `url`."""
    if weights not in ("raw", "ema"):
        raise ValueError(f"weights must be 'raw' or 'ema', got {weights!r}")
    url, marker = find_checkpoint(url, storage_options)  # the files, not the marker, say whether an EMA is there
    world = marker["world_size"]
    files = marker["files"]

    def rank_file(rank: int, suffix: str) -> str:
        found = [f for f in files if f.endswith(suffix) and f"zero_pp_rank_{rank}_" in f]
        if len(found) != 1:
            raise CheckpointError(f"{url}: expected one *zero_pp_rank_{rank}_*{suffix}, found {found}")
        return found[0]

    model_names = [rank_file(r, "model_states.pt") for r in range(world)]
    if weights == "raw":
        other = [rank_file(r, "optim_states.pt") for r in range(world)]
    else:
        other = [f"trainer_state_rank{r}.pt" for r in range(world)]
    with _local_copy(url, model_names + other, storage_options) as folder:
        verify_files(url, marker, folder, model_names + other)
        model_states = [_load(os.path.join(folder, name)) for name in model_names]
        shapes = {name: shape for group in model_states[0]["param_shapes"] for name, shape in group.items()}
        state = _mean_buffers(model_states)
        if weights == "raw":
            flats = [torch.cat(_load(os.path.join(folder, name))["optimizer_state_dict"]["fp32_flat_groups"])
                     for name in other]
            offset = 0
            for name, shape in shapes.items():
                part = math.ceil(shape.numel() / world)
                state[name] = _unshard([flat[offset:offset + part] for flat in flats], shape)
                offset += part
            if offset != flats[0].numel():
                raise CheckpointError(f"{url}: partitions hold {flats[0].numel()} elements per rank, parameters "
                                      f"account for {offset}; not a ZeRO-3 checkpoint of this layout")
        else:
            emas = [torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True).get("ema")
                    for name in other]
            if any(ema is None for ema in emas):
                raise CheckpointError(f"{url}: has no EMA weights (train.ema_decay was 0 in that run)")
            for name, shape in shapes.items():
                state[name] = _unshard([ema["params"][name] for ema in emas], shape)
            for name in state:
                if name in emas[0]["buffers"]:
                    state[name] = torch.stack([ema["buffers"][name] for ema in emas]).mean(0)
    return state, marker
