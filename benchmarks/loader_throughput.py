"""Throughput of the streaming loader against torchvision's ImageFolder + DataLoader, same run.

    python benchmarks/loader_throughput.py [--images 2000] [--workers 2] [--batch 32] [--size 224]

Corpus: generated photo-like JPEGs at 500x375 as loose files (ImageFolder), and the same
files sharded by dataprep (byte for byte, 100 per shard). Both loaders apply the same train
transform (RandomResizedCrop, flip, RandAugment(2, 9), normalise; no Mixup/CutMix, which
ImageFolder lacks) with the same number of workers and batch size, for one full epoch each.
Prints images/s for both and the ratio (goal >= 1.0), and the ceiling: single-core PIL
decode of the same JPEGs.
"""
import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).parent))
from dataprep_throughput import make_corpus  # noqa: E402

from coatnet_scale.data import LoaderSpec, StreamingLoader, TransformSpec  # noqa: E402
from coatnet_scale.data.transforms import make_sample_transform  # noqa: E402
from dataprep.images import ImageOptions  # noqa: E402
from dataprep.prep import PrepOptions, prepare  # noqa: E402


def timed_epoch(batches) -> tuple[float, int]:
    start, images = time.perf_counter(), 0
    for batch in batches:
        images += len(batch["images"] if isinstance(batch, dict) else batch[0])
    return time.perf_counter() - start, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the workers are the parallelism, as in training
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"generating {args.images} JPEGs at 500x375 and sharding them ...", flush=True)
        make_corpus(tmp / "folder", args.images)
        options = PrepOptions(samples_per_shard=100, shard_bytes=None, image=ImageOptions(max_side=0))
        prepare(str(tmp / "folder"), str(tmp / "shards"), options, workers=2, log=lambda *_: None)

        transform = TransformSpec(image_size=args.size, mixup_alpha=0, cutmix_alpha=0)
        spec = LoaderSpec(str(tmp / "shards" / "manifest.json"), args.batch, transform, num_workers=args.workers)
        ours_seconds, ours_images = timed_epoch(StreamingLoader(spec).epoch(0))

        folder = ImageFolder(str(tmp / "folder"), transform=make_sample_transform(transform))
        baseline = DataLoader(folder, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                              prefetch_factor=4, multiprocessing_context="fork")
        base_seconds, base_images = timed_epoch(baseline)
        assert ours_images == base_images == args.images, (ours_images, base_images)

        files = sorted((tmp / "folder").rglob("*.jpg"))
        blobs = [f.read_bytes() for f in files]
        start = time.perf_counter()
        for blob in blobs:
            Image.open(io.BytesIO(blob)).convert("RGB")
        decode_rate = len(blobs) / (time.perf_counter() - start)

    ours, base = ours_images / ours_seconds, base_images / base_seconds
    print(f"\none epoch, {args.images} images, batch {args.batch}, {args.workers} workers, train transform at {args.size}px:")
    print(f"  ImageFolder + DataLoader   {base:8.1f} img/s")
    print(f"  coatnet_scale.data         {ours:8.1f} img/s")
    print(f"  ratio ours / ImageFolder   {ours / base:8.2f}")
    print(f"  ceiling: single-core JPEG decode {decode_rate:.1f} img/s (x{args.workers} workers = {decode_rate * args.workers:.0f})")


if __name__ == "__main__":
    main()
