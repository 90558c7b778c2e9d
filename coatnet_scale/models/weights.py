"""Pretrained weights in and out of the model package, with torch and safetensors only.

An export (`python -m coatnet_scale.export`) is one .safetensors file whose metadata names the
model, its class count and the resolution it was trained at:

    from coatnet_scale.models.weights import load_exported
    model = load_exported("coatnet6-ft384.safetensors")                  # as trained
    model = load_exported("coatnet6-in21k.safetensors", image_size=384)  # tables resized

`adapt_state_dict` is the step every hand-off shares: resize the relative-position tables to
the new resolution and swap in a new classifier when the label set changes.
"""
from __future__ import annotations

import json
import struct

import torch
from torch import nn

from coatnet_scale.models.coatnet import CoAtNet, create_model, resize_relative_position

CLASSIFIER = ("head.weight", "head.bias")


def adapt_state_dict(
    state: dict[str, torch.Tensor], trained_image_size: int, model: nn.Module, new_classifier: bool | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`state` (trained at `trained_image_size`) made to fit `model` (which may live on the meta
    device): relative-position tables resized, and the classifier left out when `new_classifier`
    is true or, when it is None, when the class counts differ; the model keeps its own freshly
    initialised one. Returns (state dict, what was changed, for the log). Any other mismatch is
    an error naming the keys."""
    target = model.state_dict()
    notes = []
    if getattr(model, "image_size", trained_image_size) != trained_image_size:
        state = resize_relative_position(state, model.image_size, trained_image_size)
        notes.append(f"relative-position tables resized {trained_image_size} -> {model.image_size} px")
    if new_classifier is None:
        new_classifier = tuple(state["head.weight"].shape) != tuple(target["head.weight"].shape)
    if new_classifier:
        state = {k: v for k, v in state.items() if k not in CLASSIFIER}
        target = {k: v for k, v in target.items() if k not in CLASSIFIER}
        notes.append(f"new classifier for {model.num_classes} classes")
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
             for k in target if k in state and state[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            "weights do not fit this model: "
            + "; ".join(f"{label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)) if keys)
        )
    return state, notes


def save_exported(path: str, state: dict[str, torch.Tensor], model: dict, dtype: torch.dtype = torch.float32) -> None:
    """Write `state` to a .safetensors file; `model` holds name, num_classes and image_size.
    Integer buffers (BatchNorm's batch counters) keep their dtype."""
    from safetensors.torch import save_file

    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    metadata = {"format": "pt", "model": model["name"], "num_classes": str(model["num_classes"]),
                "image_size": str(model["image_size"])}
    save_file(tensors, path, metadata=metadata)


def exported_model(file) -> dict:
    """{name, num_classes, image_size} from the header of an export (an open binary file, local
    or remote: only the header is read)."""
    (length,) = struct.unpack("<Q", file.read(8))
    metadata = json.loads(file.read(length)).get("__metadata__") or {}
    if "model" not in metadata:
        raise ValueError("not an export of coatnet_scale (no model metadata in its header)")
    return {"name": metadata["model"], "num_classes": int(metadata["num_classes"]),
            "image_size": int(metadata["image_size"])}


def load_exported(path: str, image_size: int | None = None, dtype: torch.dtype = torch.float32) -> CoAtNet:
    """The model saved at `path`, built at `image_size` (default: the size it was trained at),
    weights loaded strictly."""
    from safetensors.torch import load_file

    with open(path, "rb") as f:
        source = exported_model(f)
    model = create_model(source["name"], source["num_classes"], image_size or source["image_size"])
    state, _ = adapt_state_dict(load_file(path), source["image_size"], model, new_classifier=False)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return model.to(dtype)
