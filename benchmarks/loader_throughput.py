"""Throughput of the streaming loader against torchvision's ImageFolder + DataLoader, same run.

    python benchmarks/loader_throughput.py [--images 2000] [--workers 2] [--batch 32] [--size 224] [--rounds 3]

Corpus: generated photo-like JPEGs at 500x375 as loose files (ImageFolder), and the same
files sharded by dataprep (byte for byte, 100 per shard). Both loaders apply the same train
augmentation (RandomResizedCrop, flip, RandAugment(2, 9), normalise; no Mixup/CutMix, which
ImageFolder lacks) with the same number of workers and batch size, for one full epoch each.
ImageFolder runs it as torchvision's transforms.v2 on PIL images, normalised per image, as
usual (`reference_sample_transform`); ours is the project's loader as training runs it: its
workers hand over uint8 batches, and normalising (with Mixup/CutMix, which this comparison
leaves off) runs on the training device (`StreamingLoader.to_device`), as in timm's fast loader
and FFCV. This machine has no GPU, so that part's CPU time is printed on its own line.
The two alternate for --rounds epochs each, so that a burst of load elsewhere on the machine
hits both; printed per round and as the median ratio (goal >= 1.5), with the CPU time per
image of all processes (less sensitive to other load than wall time), and the ceiling:
single-core PIL decode of the same JPEGs.
"""
import argparse
import io
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).parent))
from dataprep_throughput import make_corpus  # noqa: E402

from coatnet_scale.data import LoaderSpec, StreamingLoader, TransformSpec  # noqa: E402
from coatnet_scale.data.transforms import IMAGENET_MEAN, IMAGENET_STD, reference_sample_transform  # noqa: E402
from dataprep.images import ImageOptions  # noqa: E402
from dataprep.prep import PrepOptions, prepare  # noqa: E402


def timed_epoch(batches) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process and its children, images): a DataLoader
    without persistent workers joins them at the end of the epoch."""
    def cpu() -> float:
        us, them = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return us.ru_utime + us.ru_stime + them.ru_utime + them.ru_stime

    start, start_cpu, images = time.perf_counter(), cpu(), 0
    for batch in batches:
        images += len(batch["images"] if isinstance(batch, dict) else batch[0])
    return time.perf_counter() - start, cpu() - start_cpu, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
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
        ours = StreamingLoader(spec)
        per_image = v2.Compose([reference_sample_transform(transform), v2.ToDtype(torch.float32, scale=True),
                                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        folder = ImageFolder(str(tmp / "folder"), transform=per_image)
        rates, kept = [], []
        print(f"\none epoch each, {args.images} images, batch {args.batch}, {args.workers} workers, train transform at "
              f"{args.size}px:")
        print("  round   ImageFolder img/s (CPU ms/img)   ours img/s (CPU ms/img)   ratio")
        for r in range(args.rounds):
            base = DataLoader(folder, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                              prefetch_factor=4, multiprocessing_context="fork")
            if r % 2:  # alternate which goes first
                results = tuple(reversed((timed_epoch(ours.epoch(r)), timed_epoch(base))))
            else:
                results = timed_epoch(base), timed_epoch(ours.epoch(r))
            if r == 0:
                kept = list(ours.epoch(r))
            assert all(images == args.images for *_, images in results), results
            (base_rate, base_cpu), (our_rate, our_cpu) = ((n / wall, 1e3 * cpu / n) for wall, cpu, n in results)
            rates.append((our_rate / base_rate, base_cpu / our_cpu))
            print(f"  {r + 1:5d}   {base_rate:10.1f} ({base_cpu:5.2f})             {our_rate:10.1f} ({our_cpu:5.2f})"
                  f"         {our_rate / base_rate:5.2f}", flush=True)

        start = time.process_time()
        for batch in kept:
            ours.to_device(batch, torch.device("cpu"))
        device_ms = 1e3 * (time.process_time() - start) / args.images

        files = sorted((tmp / "folder").rglob("*.jpg"))
        blobs = [f.read_bytes() for f in files]
        start = time.perf_counter()
        for blob in blobs:
            Image.open(io.BytesIO(blob)).convert("RGB")
        decode_rate = len(blobs) / (time.perf_counter() - start)

    print(f"  ratio ours / ImageFolder, median of {args.rounds}: {statistics.median(r for r, _ in rates):.2f} "
          f"(CPU time per image: {statistics.median(c for _, c in rates):.2f})")
    print(f"  ours, the part on the training device, run on this CPU instead: {device_ms:.2f} ms/img (normalise)")
    print(f"  ceiling: single-core JPEG decode {decode_rate:.1f} img/s (x{args.workers} workers = {decode_rate * args.workers:.0f})")


if __name__ == "__main__":
    main()
