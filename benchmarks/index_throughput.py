"""How fast `python -m dataprep index` reads shards that already exist, and what that makes of
a large corpus.

    python benchmarks/index_throughput.py [--images 2000] [--workers 1 2]

Corpus: photo-like 500x375 JPEGs (ImageNet's typical size, ~100 KB), sharded by dataprep with
the images kept byte for byte (--max-side 0), 200 per shard. Each run indexes every shard
(sample counts, sizes, sha256, per-sample offsets) from a local disk, the whole command timed
(process start included), without and with --verify (every image decoded). The figure per
worker is what one CPU core reads; a cluster's CPU nodes multiply it until their network is
the limit (docs/data.md). Measured here, 6,000 images (573 MB), one process: 183 MB/s, and 31
MB/s with --verify.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dataprep_throughput import make_corpus  # noqa: E402


def index_seconds(shards: list[str], dest: Path, workers: int, verify: bool) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dataprep", "index", *shards, str(dest), "--workers", str(workers),
                    *(["--verify"] if verify else [])], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_corpus(root / "images", args.images)
        subprocess.run([sys.executable, "-m", "dataprep", str(root / "images"), str(root / "shards"), "--max-side", "0",
                        "--samples-per-shard", "200"], check=True, capture_output=True)
        shards = sorted(str(p) for p in (root / "shards").rglob("*.tar"))
        size = sum(Path(p).stat().st_size for p in shards)
        print(f"{len(shards)} shards, {args.images} images, {size / 1e6:.0f} MB")
        for verify in (False, True):
            for workers in args.workers:
                seconds = index_seconds(shards, root / f"index-{workers}-{verify}", workers, verify)
                rate = size / seconds / 1e6
                print(f"index{' --verify' if verify else ''} --workers {workers}: {seconds:.1f} s, {rate:.0f} MB/s, "
                      f"{args.images / seconds:.0f} images/s; 1 TB at {rate / workers:.0f} MB/s per core: "
                      f"{1e12 / (rate / workers * 1e6) / 3600:.1f} core-hours")


if __name__ == "__main__":
    main()
