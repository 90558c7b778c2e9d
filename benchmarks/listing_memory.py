"""Driver memory of dataprep's listing of a tar of per-class tars, per listed item, against the
objects it replaced (one `Item` per input), in the same run.

    python benchmarks/listing_memory.py [--classes 1000] [--per-class 1000]

Builds a synthetic ImageNet-21K-style archive (classes x per-class empty `nXXXXXXXX_N.JPEG`
members: listing reads headers only, so image bytes would change nothing but disk use), lists
it with `dataprep.sources.list_source`, saving its progress and result as prepare() does (outer headers in this process, inner tars by 2 worker
processes) and measures what this process allocates (tracemalloc, which sees numpy's arrays
too): held afterwards and at the peak; then the same with the shuffle order and fingerprint
prepare() computes over the listing. Goal: under 1 GiB for 14M items, i.e. under ~75 bytes per
item.
"""
import argparse
import io
import multiprocessing
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import fsspec

from dataprep.images import ImageOptions
from dataprep.prep import PrepOptions, _fingerprint, _init_worker, list_inner, shuffled_order
from dataprep.sources import SavedListing, list_source


def write_archive(path: Path, classes: int, per_class: int) -> None:
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as outer:
        for c in range(classes):
            synset = f"n{1440764 + c:08d}"
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as inner:
                for i in range(per_class):
                    inner.addfile(tarfile.TarInfo(f"{synset}_{10000 + i}.JPEG"))
            info = tarfile.TarInfo(f"{synset}.tar")
            info.size = buffer.tell()
            buffer.seek(0)
            outer.addfile(info, buffer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=1000)
    args = parser.parse_args()
    n = args.classes * args.per_class
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "archive.tar"
        print(f"writing a tar of {args.classes} class tars, {n:,} members ...", flush=True)
        write_archive(archive, args.classes, args.per_class)
        pool = multiprocessing.get_context("fork").Pool(2, initializer=_init_worker, initargs=(ImageOptions(), {}, True))
        tracemalloc.start()
        start = time.perf_counter()
        saved = SavedListing(fsspec.filesystem("file"), f"{tmp}/_progress/listing")  # saved as prepare() saves it
        listing, _ = list_source(str(archive), {}, map_inner=lambda tasks: pool.imap(list_inner, tasks), saved=saved)
        listed_seconds = time.perf_counter() - start
        pool.terminate()
        held, listing_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        start = time.perf_counter()
        order = shuffled_order(len(listing), 0)
        fingerprint = _fingerprint(str(archive), listing, PrepOptions(), sorted({c for _, c in listing.groups}))
        planning_seconds = time.perf_counter() - start
        held_all, planning_peak = tracemalloc.get_traced_memory()
        assert len(listing) == n and len(order) == n and fingerprint

        items = [listing.item(i) for i in range(n)]  # what the driver held before: one Item per input
        objects = tracemalloc.get_traced_memory()[0] - held_all
        del items
        tracemalloc.stop()

    print(f"\n{n:,} items listed in {listed_seconds:.1f}s; shuffle order and fingerprint in {planning_seconds:.1f}s")
    print(f"  listing held by the driver             {held / n:6.1f} bytes/item  ({held / 2**20:7.1f} MiB)")
    print(f"  peak while listing                     {listing_peak / n:6.1f} bytes/item  ({listing_peak / 2**20:7.1f} MiB)")
    print(f"  peak with shuffle order, fingerprint   {planning_peak / n:6.1f} bytes/item  ({planning_peak / 2**20:7.1f} MiB)")
    print(f"  baseline: one Item object per input    {objects / n:6.1f} bytes/item  ({objects / 2**20:7.1f} MiB)")
    print(f"  ratio baseline / listing held          {objects / max(1, held):6.2f}")
    print(f"  at 14M items (ImageNet-21K): peak {max(listing_peak, planning_peak) / n * 14e6 / 2**30:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())
