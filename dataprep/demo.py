"""The demo corpus: scikit-learn's 1,797 handwritten digits (real 8x8 scans), upscaled to
64x64 RGB JPEGs in an ImageFolder tree, split 80/20 train/val per class, then sharded by
dataprep into DEST/train and DEST/val. Nothing is downloaded: the images ship with sklearn."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from coatnet_scale.storage import DEMO_DIR
from dataprep.images import ImageOptions
from dataprep.prep import PrepOptions, prepare


def write_digit_folders(root: Path, val_fraction: float = 0.2, size: int = 64) -> dict[str, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = {"train": 0, "val": 0}
    rng = np.random.default_rng(0)
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng.shuffle(indices)
        n_val = round(len(indices) * val_fraction)
        for position, index in enumerate(indices):
            split = "val" if position < n_val else "train"
            pixels = (digits.images[index] * (255 / 16)).astype(np.uint8)
            image = Image.fromarray(pixels, "L").resize((size, size), Image.BICUBIC).convert("RGB")
            path = root / split / str(label) / f"{index:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, quality=95)
            counts[split] += 1
    return counts


def build_demo_corpus(dest: str = DEMO_DIR, samples_per_shard: int = 64, workers: int | None = None) -> None:
    """Write DEST/raw (ImageFolder) and DEST/{train,val} (shards + manifest); idempotent."""
    dest_path = Path(dest)
    if (dest_path / "train" / "manifest.json").exists() and (dest_path / "val" / "manifest.json").exists():
        return
    counts = write_digit_folders(dest_path / "raw")
    print(f"demo corpus: {counts['train']} train / {counts['val']} val digit images in {dest_path / 'raw'}")
    workers = workers or os.cpu_count()
    image = ImageOptions(max_side=64, min_side=8)
    prepare(str(dest_path / "raw" / "train"), str(dest_path / "train"),
            PrepOptions(split="train", samples_per_shard=samples_per_shard, shard_bytes=None, image=image), workers)
    prepare(str(dest_path / "raw" / "val"), str(dest_path / "val"),
            PrepOptions(split="val", samples_per_shard=samples_per_shard, shard_bytes=None, image=image,
                        classes=str(dest_path / "train" / "manifest.json")), workers)
