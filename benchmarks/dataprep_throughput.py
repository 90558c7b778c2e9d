"""Throughput of `python -m dataprep` against a plain single-process loop, in the same run.

    python benchmarks/dataprep_throughput.py [--images 4000] [--workers 2] [--max-side 256]

Corpus: generated photo-like JPEGs at 500x375 (ImageNet's typical size), in an ImageFolder.
1. Re-encode path: dataprep (resize to --max-side, re-encode, shard) against a loop that does
   PIL open, resize, encode and tar append on the same files. Ratio goal: >= 1.8 on 2 cores.
   The dataprep figure is the whole command, process start and listing included, with
   100 images per shard (a shard is one worker's task; real corpora have thousands).
2. Pass-through path (--max-side 0: the JPEGs are kept byte for byte after a 1/8-scale decode
   that proves them complete): MB/s against a plain copy of the same files.
"""
import argparse
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_corpus(root: Path, images: int, classes: int = 10) -> int:
    rng = np.random.default_rng(0)
    total = 0
    for i in range(images):
        small = rng.random((375 // 8 + 1, 500 // 8 + 1, 3))
        pixels = (np.kron(small, np.ones((8, 8, 1)))[:375, :500] * 255).astype(np.uint8)
        pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)  # sensor noise
        path = root / f"class{i % classes:03d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        total += path.stat().st_size
    return total


def baseline_loop(files: list[Path], out: Path, max_side: int) -> None:
    with tarfile.open(out, "w") as tar:
        for i, path in enumerate(files):
            img = Image.open(path).convert("RGB")
            scale = max_side / min(img.size)
            if scale < 1:
                img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
            buffer = io.BytesIO()
            img.save(buffer, "JPEG", quality=90)
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = buffer.tell()
            tar.addfile(info, io.BytesIO(buffer.getvalue()))


def run_dataprep(source: Path, dest: Path, workers: int, max_side: int) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "dataprep", str(source), str(dest), "--workers", str(workers), "--max-side", str(max_side),
         "--samples-per-shard", "100"],
        check=True, capture_output=True,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-side", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "corpus"
        print(f"generating {args.images} JPEGs at 500x375 ...", flush=True)
        corpus_bytes = make_corpus(source, args.images)
        files = sorted(source.rglob("*.jpg"))

        start = time.perf_counter()
        baseline_loop(files, tmp / "baseline.tar", args.max_side)
        baseline_seconds = time.perf_counter() - start
        ours_seconds = run_dataprep(source, tmp / "shards", args.workers, args.max_side)
        baseline_rate, ours_rate = args.images / baseline_seconds, args.images / ours_seconds
        print(f"\nre-encode path (shorter side -> {args.max_side}px), {args.images} images:")
        print(f"  plain loop (1 process)       {baseline_rate:8.1f} img/s")
        print(f"  dataprep --workers {args.workers}         {ours_rate:8.1f} img/s")
        print(f"  ratio dataprep / loop        {ours_rate / baseline_rate:8.2f}")

        copy_dir = tmp / "copy"
        copy_dir.mkdir()
        start = time.perf_counter()
        for i, path in enumerate(files):
            shutil.copyfile(path, copy_dir / f"{i:06d}.jpg")
        copy_seconds = time.perf_counter() - start
        pass_seconds = run_dataprep(source, tmp / "passthrough", args.workers, 0)
        megabytes = corpus_bytes / 1e6
        print(f"\npass-through path ({megabytes:.0f} MB of JPEG kept byte for byte):")
        print(f"  plain file copy              {megabytes / copy_seconds:8.1f} MB/s")
        print(f"  dataprep --max-side 0        {megabytes / pass_seconds:8.1f} MB/s")
        print(f"  ratio dataprep / copy        {copy_seconds / pass_seconds:8.2f}")


if __name__ == "__main__":
    main()
