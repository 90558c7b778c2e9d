"""Bytes the loader fetches from storage per epoch against the bytes of the samples it uses, with
per-sample offsets (ranged reads) and without them (each slot streams its first shard from byte
0, as before offsets existed), in the same run.

    python benchmarks/read_amplification.py [--images 1600] [--per-shard 400] [--ranks 8] [--workers 2]

Measured: a dataprep corpus of photo-like 500x375 JPEGs (~100 KB per sample), read through the
loader's own slot reader (`epoch_keys`: every (rank, worker) slot of an epoch, no decoding) on
a local filesystem wrapped to count every byte read through fsspec. "Used" is the tar bytes of
each slot's samples (headers and padding included). Goal: <= 1.05x.

Computed: the same arithmetic (plan.py's slots, the offsets files' byte ranges) for ImageNet-1K's
validation set (50,000 samples of ~128 KiB in 256 MiB shards) at 128 ranks x 6 workers, for an
evaluation pass (no shuffle) and a training epoch; the model is checked against the measurement.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

sys.path.insert(0, str(Path(__file__).parent))
from dataprep_throughput import make_corpus  # noqa: E402

from coatnet_scale.data import LoaderSpec, TransformSpec, epoch_keys  # noqa: E402
from coatnet_scale.data.plan import exact_plan  # noqa: E402
from dataprep.images import ImageOptions  # noqa: E402
from dataprep.prep import PrepOptions, prepare  # noqa: E402

STREAM_READ = 10240  # tarfile's stream mode reads in records of 20 blocks


class CountingOpener(LocalFileOpener):
    def read(self, *args, **kwargs):
        data = self.f.read(*args, **kwargs)
        if not self.path.endswith(".json"):  # shards and offsets files; the manifest is read once per rank
            CountingFileSystem.fetched += len(data)
        return data


class CountingFileSystem(LocalFileSystem):
    """A local filesystem under the protocol counted:// that counts the bytes read through it."""

    protocol = "counted"
    fetched = 0

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return super()._strip_protocol(path[len("counted://"):] if path.startswith("counted://") else path)

    def unstrip_protocol(self, name):
        return "counted://" + self._strip_protocol(name)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        return CountingOpener(self._strip_protocol(path), mode, fs=self, **kwargs)


fsspec.register_implementation("counted", CountingFileSystem, clobber=True)


def model_bytes(offsets: list[np.ndarray], ranks: int, workers: int, shuffle: bool, block: int = 0) -> tuple[int, int, int]:
    """(used, fetched with offsets, fetched without) for one epoch, from the plan and the offsets
    alone. Without offsets a slot reads each of its shards from byte 0 to its last sample, plus
    up to `block` bytes of read-ahead; with offsets exactly its samples, plus 8 bytes per offset read."""
    sizes = [len(o) - 1 for o in offsets]
    used = ranged = streamed = 0
    for rank in range(ranks):
        for worker in range(workers):
            for s in exact_plan(sizes, 0, 0, rank, ranks, worker, workers, 32, shuffle=shuffle).segments:
                o = offsets[s.shard]
                used += int(o[s.skip + s.take] - o[s.skip])
                ranged += int(o[s.skip + s.take] - o[s.skip]) + 8 * (s.take + 1)
                streamed += min(int(o[-1]), int(o[s.skip + s.take]) + block)
    return used, ranged, streamed


def measure(manifest: Path, ranks: int, workers: int) -> int:
    spec = LoaderSpec(f"counted://{manifest}", 32, TransformSpec(image_size=32, train=False), num_workers=workers,
                      shuffle=False)
    CountingFileSystem.fetched = 0
    keys = [k for rank in range(ranks) for k in epoch_keys(spec, rank, ranks, 0)]
    assert len(keys) == len(set(keys)) == json.loads(manifest.read_text())["total_samples"]
    return CountingFileSystem.fetched


def imagenet_val_offsets(rng) -> list[np.ndarray]:
    """50,000 samples of lognormal size around 128 KiB as tar members (.cls, .jpg, .json: 3 headers,
    each member padded to 512 bytes), cut into shards of at most 256 MiB."""
    member = lambda n: 512 + -(-n // 512) * 512  # noqa: E731
    jpeg = rng.lognormal(np.log(110_000), 0.5, 50_000).astype(np.int64)
    sample = member(1) + np.array([member(int(n)) for n in jpeg]) + member(90)
    shards, current = [], [0]
    for size in sample:
        if current[-1] + size > 256 * 2**20:
            shards.append(np.array(current))
            current = [0]
        current.append(current[-1] + int(size))
    shards.append(np.array(current))
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1600)
    parser.add_argument("--per-shard", type=int, default=400)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"generating {args.images} JPEGs at 500x375 and sharding them ...", flush=True)
        make_corpus(tmp / "folder", args.images)
        options = PrepOptions(samples_per_shard=args.per_shard, shard_bytes=None, image=ImageOptions(max_side=0))
        prepare(str(tmp / "folder"), str(tmp / "shards"), options, workers=2, log=lambda *_: None)
        manifest_path = tmp / "shards" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        offsets = [np.fromfile(tmp / "shards" / s["offsets"], dtype="<u8").astype(np.int64) for s in manifest["shards"]]
        bare = dict(manifest, shards=[{k: v for k, v in s.items() if k != "offsets"} for s in manifest["shards"]])
        (tmp / "shards" / "bare.json").write_text(json.dumps(bare))

        ranged = measure(manifest_path, args.ranks, args.workers)
        streamed = measure(tmp / "shards" / "bare.json", args.ranks, args.workers)
        used, model_ranged, model_streamed = model_bytes(offsets, args.ranks, args.workers, shuffle=False)
        mean = sum(o[-1] for o in offsets) / manifest["total_samples"]

    print(f"\nmeasured: {manifest['total_samples']} samples ({mean / 1e3:.0f} KB each in the tar), "
          f"{len(offsets)} shards, {args.ranks} ranks x {args.workers} workers, one epoch:")
    print(f"  bytes used by the slots          {used / 1e6:10.1f} MB")
    print(f"  fetched with offsets (ranged)    {ranged / 1e6:10.1f} MB   ratio {ranged / used:.4f}   (model: {model_ranged / used:.4f})")
    print(f"  fetched without offsets (stream) {streamed / 1e6:10.1f} MB   ratio {streamed / used:.4f}   (model: {model_streamed / used:.4f})")
    assert ranged == model_ranged, (ranged, model_ranged)

    shards = imagenet_val_offsets(np.random.default_rng(0))
    total = sum(int(o[-1]) for o in shards)
    print(f"\ncomputed: ImageNet-1K val, 50,000 samples in {len(shards)} shards of <= 256 MiB "
          f"({total / 1e9:.2f} GB), 128 ranks x 6 workers, streaming with 4 MiB read-ahead:")
    for name, shuffle in (("evaluation pass", False), ("training epoch", True)):
        used, ranged, streamed = model_bytes(shards, 128, 6, shuffle, block=4 * 2**20)
        print(f"  {name:16s} used {used / 1e9:6.2f} GB   with offsets {ranged / 1e9:6.2f} GB ({ranged / used:.4f}x)"
              f"   without {streamed / 1e9:7.2f} GB ({streamed / used:.2f}x)")


if __name__ == "__main__":
    main()
