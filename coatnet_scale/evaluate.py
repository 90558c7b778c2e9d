"""`python -m coatnet_scale.evaluate --checkpoint URL --data MANIFEST_URL [--image-size N]`

Top-1/top-5 of a checkpoint (any number of writers; a run or checkpoints folder means its
newest complete checkpoint) or an export (.safetensors) on a dataprep manifest, in one
process: the GPU when there is one, else the CPU. `--image-size` evaluates at another
resolution than the weights were trained at (tables resized, as for fine-tuning); images are
resized to image_size / crop-ratio and centre-cropped. Prints one line and, with --json, the
figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from coatnet_scale.data import LoaderSpec, StreamingLoader, TransformSpec, load_manifest
from coatnet_scale.engine.pretrained import read_weights
from coatnet_scale.models import create_model
from coatnet_scale.models.weights import adapt_state_dict


def load_model(url: str, weights: str = "raw", image_size: int | None = None) -> tuple[torch.nn.Module, dict]:
    """The model held by a checkpoint or export, built at `image_size` (default: as trained), and
    what its source records (name, classes, size; a checkpoint also its run's eval crop ratio)."""
    state, source = read_weights(url, weights, {})
    model = create_model(source["name"], source["num_classes"], image_size or source["image_size"])
    state, _ = adapt_state_dict(state, source["image_size"], model, new_classifier=False)
    model.load_state_dict(state, strict=True)
    return model, source


@torch.no_grad()
def evaluate(model: torch.nn.Module, manifest_url: str, batch_size: int = 64, num_workers: int = 2,
             crop_ratio: float = 0.875, device: torch.device | None = None) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = load_manifest(manifest_url)
    if len(manifest.classes) != model.num_classes:
        raise ValueError(f"{manifest_url} has {len(manifest.classes)} classes, the model {model.num_classes}")
    spec = LoaderSpec(manifest_url=manifest_url, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                      transform=TransformSpec(image_size=model.image_size, train=False, crop_ratio=crop_ratio))
    model = model.to(device).eval()
    top1 = top5 = samples = 0
    loader = StreamingLoader(spec)
    for batch in loader.epoch(0):
        images, labels = loader.to_device(batch, device)
        logits = model(images).float()
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += (best[:, 0] == labels).sum().item()
        top5 += (best == labels[:, None]).any(dim=1).sum().item()
        samples += len(labels)
    return {"top1": top1 / samples, "top5": top5 / samples, "samples": samples, "image_size": model.image_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coatnet_scale.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint URL or .safetensors export")
    parser.add_argument("--data", required=True, help="manifest URL of the evaluation split")
    parser.add_argument("--image-size", type=int, help="resolution to evaluate at (default: as trained)")
    parser.add_argument("--weights", choices=["raw", "ema"], default="raw", help="checkpoints only")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--crop-ratio", type=float,
                        help="resize to size / ratio, centre crop (default: the run's data.eval_crop_ratio, else 0.875)")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = parser.parse_args(argv)
    if args.image_size is not None and (args.image_size < 32 or args.image_size % 32):
        parser.error(f"--image-size must be a multiple of 32, got {args.image_size}")
    try:
        model, source = load_model(args.checkpoint, args.weights, args.image_size)
        crop_ratio = args.crop_ratio or source.get("eval_crop_ratio") or 0.875
        result = evaluate(model, args.data, args.batch_size, args.num_workers, crop_ratio)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    print(f"evaluate: {args.checkpoint} at {result['image_size']} px on {args.data}: top-1 {result['top1']:.4f} "
          f"top-5 {result['top5']:.4f} ({result['samples']} images)")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
