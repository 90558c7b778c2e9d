"""Peak memory of sharding one parquet file many times larger than its row groups.

    python benchmarks/parquet_memory.py [--row-groups 24] [--rows-per-group 64] [--image-kib 100]

Writes a Hub-style parquet file (image {bytes, path}, label; pyarrow, row groups of
rows-per-group rows) of distinct real JPEGs of about --image-kib each, then shards the whole
file as one task in a fresh child process (dataprep.parquet.write_parquet_shard, as a worker
runs it), and reports that process's peak RSS (ru_maxrss) above its RSS before the task,
against the file's and one row group's size, for the first 2 row groups and for all of them.
Then, for scale, the peak of reading the same file
whole with pyarrow.parquet.read_table. Goal: the streamed peak stays near a row group, not the file.
"""
import argparse
import io
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

MiB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def jpeg(rng, kib: int) -> bytes:
    """A noisy photo-sized JPEG of about `kib` KiB (noise keeps it from compressing away)."""
    side = int((kib * 1024 / 0.9) ** 0.5)  # ~0.9 bytes per pixel at quality 90 on noise
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_file(path: Path, groups: int, per_group: int, kib: int) -> None:
    rng = np.random.default_rng(0)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    with pq.ParquetWriter(path, pa.schema([("image", image), ("label", pa.int64())])) as writer:
        for g in range(groups):  # one group at a time: this process never holds the file either
            cells = [{"bytes": jpeg(rng, kib), "path": f"{g}-{i}.jpg"} for i in range(per_group)]
            writer.write_table(pa.table({"image": pa.array(cells, image),
                                         "label": pa.array([i % 10 for i in range(per_group)], pa.int64())}),
                               row_group_size=per_group)


def shard_it(path: str, dest: str, rows: int, queue) -> None:
    from dataprep import prep
    from dataprep.images import ImageOptions
    from dataprep.parquet import ParquetTask, write_parquet_shard

    prep._init_worker(ImageOptions(max_side=0), {})
    Path(dest).mkdir()
    before = rss()
    start = time.monotonic()
    record = write_parquet_shard(ParquetTask(0, "train-000000.tar", dest, path, 0, rows, "image", "label", None,
                                             tuple(str(i) for i in range(10))))
    queue.put((before, peak(), record["shard"]["samples"], time.monotonic() - start))


def read_whole(path: str, queue) -> None:
    before = rss()
    table = pq.read_table(path)
    queue.put((before, peak(), table.num_rows, 0.0))


def in_child(target, *args):
    """target(*args) in a fresh process (fork: nothing of this one's is touched there)."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"{target.__name__} failed (exit {child.exitcode})")
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row-groups", type=int, default=24)
    parser.add_argument("--rows-per-group", type=int, default=64)
    parser.add_argument("--image-kib", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train-00000-of-00001.parquet"
        write_file(path, args.row_groups, args.rows_per_group, args.image_kib)
        meta = pq.ParquetFile(path).metadata
        group = max(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        size = path.stat().st_size
        print(f"file: {size / MiB:.0f} MiB, {meta.num_rows} rows in {meta.num_row_groups} row groups of "
              f"{group / MiB:.1f} MiB ({size / group:.0f}x a row group)")
        for groups in (2, meta.num_row_groups):  # the peak must not grow with the rows read
            rows = sum(meta.row_group(i).num_rows for i in range(groups))
            before, top, samples, seconds = in_child(shard_it, str(path), str(Path(tmp) / f"out{groups}"), rows)
            print(f"streamed (write_parquet_shard), {groups} row groups: {samples} samples in {seconds:.1f}s; peak RSS "
                  f"{top / MiB:.0f} MiB, {(top - before) / MiB:.0f} MiB above the {before / MiB:.0f} MiB before the task")
        before, top, rows, _ = in_child(read_whole, str(path))
        print(f"for scale, pyarrow.parquet.read_table of the whole file: peak RSS {(top - before) / MiB:.0f} MiB above "
              f"the {before / MiB:.0f} MiB before")


if __name__ == "__main__":
    main()
