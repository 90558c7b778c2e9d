"""`python -m coatnet_scale.export CHECKPOINT_URL OUT.safetensors [--weights raw|ema] [--dtype fp32|bf16]`

Consolidates a ZeRO-3 checkpoint (any number of writers, local or on any fsspec store; a run
or checkpoints folder means its newest complete checkpoint) into one safetensors file that
loads with only the model package:

    from coatnet_scale.models.weights import load_exported
    model = load_exported("OUT.safetensors", image_size=384)

The file appears only when complete (written beside the target, then renamed or uploaded).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from coatnet_scale.engine.consolidate import CheckpointError, consolidate
from coatnet_scale.models.weights import save_exported
from coatnet_scale.storage import url_to_fs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export(checkpoint_url: str, out_url: str, weights: str = "raw", dtype: str = "fp32",
           storage_options: dict | None = None) -> dict:
    """Write the export; returns the checkpoint's marker (step, world size, model)."""
    state, marker = consolidate(checkpoint_url, storage_options, weights)
    fs, path = url_to_fs(out_url, storage_options)
    if "://" not in out_url or out_url.startswith("file://"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        temporary = f"{path}.partial"
        try:
            save_exported(temporary, state, marker["model"], DTYPES[dtype])
            with open(temporary, "rb") as f:
                os.fsync(f.fileno())  # on disk before the name says it is complete
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    else:
        with tempfile.TemporaryDirectory(prefix="coatnet_scale_export_") as folder:
            local = os.path.join(folder, "weights.safetensors")
            save_exported(local, state, marker["model"], DTYPES[dtype])
            fs.put_file(local, path)  # one upload: the object appears whole or not at all
    return marker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coatnet_scale.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint URL: a step folder, or a run / checkpoints folder (newest)")
    parser.add_argument("out", help="output .safetensors path or URL")
    parser.add_argument("--weights", choices=["raw", "ema"], default="raw", help="raw weights or their EMA")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        parser.error(f"out: {args.out} must end in .safetensors")
    try:
        marker = export(args.checkpoint, args.out, args.weights, args.dtype)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    m = marker["model"]
    print(f"export: {m['name']} ({m['num_classes']} classes, {m['image_size']} px) from step {marker['step']} "
          f"of {marker['world_size']} workers -> {args.out} ({args.weights}, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
