"""Starting a run from earlier weights (`finetune.init_checkpoint`), into a model ZeRO-3 has
already partitioned.

Rank 0 reads the weights (a checkpoint of any world size, consolidated, or an export), resizes
the relative-position tables to this run's resolution and leaves out the classifier when the
label set changes. Then, parameter by parameter, the ranks gather it, rank 0 writes it, and
DeepSpeed partitions it again: beyond rank 0's copy of the weights, no process ever holds more
than one whole parameter. A bad URL or a model mismatch found on rank 0 is raised on every
rank, so no rank is left waiting in a collective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from coatnet_scale.engine import collectives
from coatnet_scale.models import create_model
from coatnet_scale.models.weights import adapt_state_dict, exported_model
from coatnet_scale.storage import url_to_fs


def describe_weights(url: str, weights: str, storage_options: dict) -> tuple[str, dict]:
    """(where the weights are, what they hold: model name, num_classes, image_size and, for a
    checkpoint, its run's eval_crop_ratio), from an export's header or a checkpoint's marker
    alone: preflight's check before any worker starts, and the first step of reading them."""
    if url.endswith(".safetensors"):
        if weights == "ema":
            raise ValueError(f"{url}: an export holds one set of weights; 'ema' applies to checkpoints")
        fs, path = url_to_fs(url, storage_options)
        if not fs.exists(path):
            raise FileNotFoundError(f"{url} does not exist")
        with fs.open(path, "rb") as f:
            return url, exported_model(f)
    from coatnet_scale.engine.consolidate import find_checkpoint

    found, marker = find_checkpoint(url, storage_options, weights)
    return found, {**marker["model"], "eval_crop_ratio": marker.get("eval_crop_ratio")}


def require_model(config, found: str, source: dict) -> None:
    if source["name"] != config.model.name:
        raise ValueError(f"{found} holds {source['name']}, but model.name is {config.model.name}")


def read_weights(url: str, weights: str, storage_options: dict) -> tuple[dict, dict]:
    """(state dict, what `describe_weights` says of it) from a checkpoint or export."""
    found, source = describe_weights(url, weights, storage_options)
    if url.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        fs, path = url_to_fs(url, storage_options)
        state = load_safetensors(fs.cat_file(path))
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, source
    from coatnet_scale.engine.consolidate import consolidate

    state, _ = consolidate(found, storage_options, weights)
    return state, source


def prepared_weights(config, storage_options: dict) -> tuple[dict, list[str]]:
    """The init weights fitted to this run's model, and notes on what was adapted."""
    f, m = config.finetune, config.model
    state, source = read_weights(f.init_checkpoint, f.init_weights, storage_options)
    require_model(config, f.init_checkpoint, source)
    with torch.device("meta"):
        reference = create_model(m.name, m.num_classes, m.image_size)
    state, notes = adapt_state_dict(state, source["image_size"], reference, f.new_classifier)
    return state, [f"{source['name']} from {f.init_checkpoint} ({f.init_weights} weights)", *notes]


def _broadcast_from_rank0(tensor: torch.Tensor, value: torch.Tensor | None) -> None:
    """tensor <- rank 0's value, through the training device (before deepspeed.initialize an
    unpartitioned model still sits on the CPU, where NCCL cannot send it)."""
    staged = (value if value is not None else tensor).to(device=collectives.device(), dtype=tensor.dtype).clone()
    collectives.broadcast(staged, src=0)
    tensor.copy_(staged)


def load_initial_weights(model: torch.nn.Module, config, storage_options: dict, rank: int) -> list[str]:
    """Collective. Load `config.finetune.init_checkpoint` into `model`; returns the notes."""
    import deepspeed

    message = [None, None]  # [error or None, (names to load, notes)]
    state = {}
    if rank == 0:
        try:
            state, notes = prepared_weights(config, storage_options)
            message[1] = (sorted(state), notes)
        except Exception as e:  # raised below on every rank, after they all know
            message[0] = f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise RuntimeError(f"cannot start from finetune.init_checkpoint: {message[0]}")
    names, notes = message[1]
    names = set(names)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in names:
                continue
            if hasattr(param, "ds_id"):  # partitioned by ZeRO-3
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if rank == 0:
                        param.data.copy_(state[name])
            else:
                _broadcast_from_rank0(param.data, state.get(name))
        for name, buffer in model.named_buffers():
            if name in names:
                _broadcast_from_rank0(buffer, state.get(name))
    return notes
