"""Shard a corpus: list, shuffle, plan shards, convert and write shards in parallel, manifest.

The plan is fixed before any image is read: inputs are shuffled with the seed and cut into
runs of N consecutive inputs, one run per shard (a shard holds N samples minus the inputs it
rejects). Each shard is then one independent task: a worker (a local process, or a CPU of a
Ray cluster) reads its inputs, converts them, writes the tar and publishes it. Image bytes
never pass through this process, and the output depends only on SOURCE and the options,
never on the number of workers.

Resuming: when a shard is published, a record of it (name, size, sha256, the inputs it
rejected) goes to DEST/_progress/. A rerun with the same arguments keeps every shard whose
record carries the same fingerprint of inputs and options and whose file is present with the
recorded size, and redoes the rest. The manifest is written last, then the records removed.
The listing is saved there too (sources.py), so a rerun does not list SOURCE again.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import random
import socket
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from coatnet_scale.storage import url_to_fs
from dataprep.images import ImageOptions, Rejected, convert_image
from coatnet_scale.shard_format import encode_offsets
from dataprep.shards import (
    ShardWriter,
    offsets_name,
    publish_bytes,
    publish_file,
    remove_stale_temporaries,
    shard_name,
    staging_directory,
)
from dataprep import sources
from dataprep.sources import Item, Listing, SavedListing, SourceRejection, list_source, read_item

MANIFEST_FORMAT = "coatnet_scale.dataprep/1"


class PrepError(RuntimeError):
    """A problem with DEST or the arguments, reported before any work is lost."""


@dataclass(frozen=True)
class PrepOptions:
    split: str = "train"
    samples_per_shard: int | None = None  # exact inputs per shard
    shard_bytes: int | None = 256 * 2**20  # aim: inputs per shard chosen from the mean input size
    seed: int = 0
    labels: str | None = None  # labels file URL, for a folder or tar of images
    classes: str | None = None  # a manifest.json or a text file, one class per line: fixes label order
    image: ImageOptions = field(default_factory=ImageOptions)


# ---------------------------------------------------------------------------------------
# Worker side

_worker: dict = {}


def _init_worker(image_options: ImageOptions, storage_options: dict, die_with_parent: bool = False) -> None:
    _worker.update(image_options=image_options, storage_options=storage_options, filesystems={})
    if die_with_parent and sys.platform == "linux":
        # A killed dataprep must not leave workers publishing shards behind a rerun's back.
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


READ_ATTEMPTS = 4


def _read(item: Item) -> bytes:
    """The input's bytes. A missing or forbidden file is a rejection; anything else (throttling,
    resets, timeouts) is retried, then fails the shard, so a rerun redoes it: output never
    depends on network luck."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return read_item(item, _worker["filesystems"], _worker["storage_options"])
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise Rejected("unreadable", type(e).__name__) from None
        except Exception as e:
            if attempt == READ_ATTEMPTS - 1:
                raise OSError(f"{item.path}: read failed {READ_ATTEMPTS} times, last: {type(e).__name__}: {e}") from e
            time.sleep(0.5 * 2**attempt)


def _convert(item: Item) -> tuple[bytes, int, int]:
    data = _read(item)
    try:
        return convert_image(data, _worker["image_options"])
    except Rejected:
        raise
    except Exception as e:  # a bug or an exotic file: report it against this input, keep going
        raise Rejected("processing error", f"{type(e).__name__}: {e}") from None


def open_dest(dest: str, storage_options: dict):
    fs, root = url_to_fs(dest, storage_options)
    return fs, root.rstrip("/")


@dataclass(frozen=True)
class ShardTask:
    index: int
    name: str
    dest: str
    inputs: list[tuple[str, Item, int]]  # (sample key, input, label)


def write_shard(task: ShardTask) -> dict:
    """Convert one shard's inputs, publish the tar, return its progress record (sans fingerprint)."""
    fs, root = open_dest(task.dest, _worker["storage_options"])
    writer = ShardWriter(staging_directory(fs, root))
    rejected = []
    try:
        for key, item, label in task.inputs:
            try:
                jpeg, width, height = _convert(item)
            except Rejected as r:
                rejected.append({"path": item.path, "reason": r.reason, "detail": r.detail})
                continue
            meta = {"source": item.path, "class": item.class_name, "width": width, "height": height}
            writer.add(key, jpeg, label, meta)
        shard = publish_shard(writer, fs, root, task.name)
    except BaseException:
        writer.discard()
        raise
    return {"index": task.index, "shard": shard, "rejected": rejected, "inputs": len(task.inputs)}


def publish_shard(writer: ShardWriter, fs, root: str, name: str) -> dict | None:
    """Close a shard's tar and publish its offsets, then the tar (so no reader finds a shard
    without its offsets); returns its manifest entry, or None for a shard left empty."""
    if not writer.samples:
        writer.discard()
        return None
    size, sha256 = writer.close()
    offsets = offsets_name(name)
    publish_bytes(fs, f"{root}/{offsets}", encode_offsets(writer.offsets))
    publish_file(fs, writer.path, f"{root}/{name}")
    return {"name": name, "samples": writer.samples, "bytes": size, "sha256": sha256, "offsets": offsets}


def list_inner(task: tuple[int, str, int, int]) -> tuple:
    """sources.list_inner in a pool worker, with the worker's storage options."""
    return sources.list_inner(task, _worker["storage_options"])


# ---------------------------------------------------------------------------------------
# Progress


class Progress:
    """A tqdm bar on a terminal; a plain line every `interval` seconds otherwise."""

    def __init__(self, total: int, done: int, shards: int, interval: float = 10.0):
        self.total, self.done, self.rejected, self.interval = total, done, 0, interval
        self.shards_total, self.shards_done = shards, 0
        self.start = self.last = time.monotonic()
        self.start_done = done
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="img", smoothing=0.1, file=sys.stderr)

    def update(self, inputs: int, rejected: int) -> None:
        self.done += inputs
        self.rejected += rejected
        self.shards_done += 1
        if self.bar is not None:
            self.bar.set_postfix(shards=f"{self.shards_done}/{self.shards_total}", rejected=self.rejected, refresh=False)
            self.bar.update(inputs)
            return
        now = time.monotonic()
        if now - self.last >= self.interval or self.shards_done == self.shards_total:
            self.last = now
            print(self.line(), file=sys.stderr, flush=True)

    def rate(self) -> float:
        return (self.done - self.start_done) / max(1e-9, time.monotonic() - self.start)

    def line(self) -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (
            f"dataprep: {self.done}/{self.total} inputs ({100 * self.done / max(1, self.total):.1f}%), "
            f"{self.shards_done}/{self.shards_total} shards, {rate:.0f} img/s, ETA {eta / 60:.1f} min, "
            f"{self.rejected} rejected"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------
# Orchestration


def _class_list(listing: Listing, classes_url: str | None, storage_options: dict) -> list[str]:
    if classes_url is None:
        return sort_class_names({listing.groups[g][1] for g in np.unique(listing.group)})
    return read_classes(classes_url, storage_options)


def sort_class_names(names) -> list[str]:
    """Numerically when every name is a number (2 before 10), else as text."""
    return sorted(names, key=(lambda n: (int(n), n)) if all(n.isdigit() for n in names) else str)


def read_classes(classes_url: str, storage_options: dict) -> list[str]:
    """Class order from a manifest.json or a text file, one class per line."""
    try:
        fs, path = url_to_fs(classes_url, storage_options)
        text = fs.cat_file(path).decode()
    except FileNotFoundError:
        raise PrepError(f"{classes_url}: classes file not found") from None
    if classes_url.endswith(".json"):
        return json.loads(text)["classes"]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _fingerprint(source: str, listing: Listing, options: PrepOptions, classes: list[str]) -> str:
    digest = hashlib.sha256(json.dumps([source, asdict(options), classes], sort_keys=True).encode())
    for i in range(len(listing)):
        digest.update(f"{listing.path(i)}\0{listing.class_name(i)}\0{listing.lengths[i]}\n".encode())
    return digest.hexdigest()


def shuffled_order(n: int, seed: int) -> np.ndarray:
    """random.Random(seed).shuffle(list(range(n))), in 4 bytes per input instead of ~36."""
    order = np.arange(n, dtype=np.int32)
    randbelow = random.Random(seed)._randbelow  # what Random.shuffle draws from, in the same order
    for i in range(n - 1, 0, -1):
        j = randbelow(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def inputs_per_shard(listing: Listing, options: PrepOptions) -> int:
    candidates = []
    if options.samples_per_shard:
        candidates.append(options.samples_per_shard)
    if options.shard_bytes:
        mean_size = float(listing.lengths.mean()) if len(listing) else 0.0
        candidates.append(max(1, int(options.shard_bytes // max(1.0, mean_size + 2048))))
    return min(candidates)


def progress_records(fs, root: str, fingerprint: str, what: str):
    """The progress records under DEST/_progress/, each of this same run (`fingerprint`); a
    record of another run stops everything, naming `what` that run was made from."""
    directory = f"{root}/_progress"
    if not fs.exists(directory):
        return
    for path in sorted(fs.ls(directory, detail=False)):
        if not path.endswith(".json"):
            continue
        record = json.loads(fs.cat_file(path))
        if record.get("fingerprint") != fingerprint:
            raise PrepError(f"{root}: holds an unfinished {what}; rerun it with its original arguments, or use an "
                            f"empty DEST")
        yield record


def _finished_records(fs, root: str, fingerprint: str, planned: int, log) -> dict[int, dict]:
    """Progress records of this same run whose shard is present with the recorded size."""
    finished = {}
    for record in progress_records(fs, root, fingerprint, "run made from other inputs or options"):
        shard = record["shard"]
        if shard is not None:
            shard_path = f"{root}/{shard['name']}"
            offsets = shard.get("offsets")
            if (not fs.exists(shard_path) or fs.size(shard_path) != shard["bytes"]
                    or (offsets and fs.size(f"{root}/{offsets}") != 8 * (shard["samples"] + 1))):
                log(f"dataprep: {shard['name']} is missing or differs from its record; writing it again")
                continue
        if record["index"] < planned:
            finished[record["index"]] = record
    return finished


def _connect_ray(address: str) -> None:
    """Join the cluster at ADDRESS (else $RAY_ADDRESS) only if it answers within seconds; with
    neither, start a private local instance on loopback, never whatever cluster this machine
    last started (Ray's address file names it, and ray.init() waits minutes when it is gone)."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: stay on loopback
    import ray

    if ray.is_initialized():
        return
    if not address:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)
        return
    if address != "auto":
        host, _, port = address.split("://")[-1].rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise PrepError(f"--ray {address}: no Ray cluster answers there ({e})") from None
    ray.init(address=address)


def _make_pool(workers: int, ray_address: str | None, initargs: tuple):
    if ray_address is not None:
        from ray.util.multiprocessing import Pool as RayPool

        _connect_ray(ray_address)
        return RayPool(processes=workers or None, initializer=_init_worker, initargs=initargs)
    # fork starts workers at once, with modules loaded; fsspec resets its event loop and its
    # filesystem cache in forked children, and no other thread runs yet (the progress bar's
    # starts after the pool).
    context = multiprocessing.get_context("fork")
    return context.Pool(workers, initializer=_init_worker, initargs=(*initargs, True))


def prepare(
    source: str,
    dest: str,
    options: PrepOptions,
    workers: int,
    ray_address: str | None = None,
    storage_options: dict | None = None,
    log=print,
    observe=None,
) -> dict:
    """Shard SOURCE into DEST; return the manifest. Safe to rerun after a crash.

    `observe(record)`, if given, sees the listing's rejections and then each shard this run
    finishes: {"shard": {...} or None, "rejected": [{"path", "reason", "detail"}, ...]}."""
    storage_options = storage_options or {}
    fs, root = open_dest(dest, storage_options)
    fs.makedirs(root, exist_ok=True)

    pool = _make_pool(workers, ray_address, (options.image, storage_options))
    progress = None
    try:
        manifest_path = f"{root}/manifest.json"
        finished = fs.exists(manifest_path)  # then nothing is saved: there is nothing to resume
        saved = SavedListing() if finished else SavedListing(fs, f"{root}/_progress/listing")
        listing, source_rejections = list_source(source, storage_options, options.labels,
                                                 lambda tasks: pool.imap(list_inner, tasks), saved, log)
        classes = _class_list(listing, options.classes, storage_options)
        label_of = {name: label for label, name in enumerate(classes)}
        known = np.array([class_name in label_of for _, class_name in listing.groups], dtype=bool)
        if len(listing) and not known[listing.group].all():
            unknown = np.flatnonzero(~known[listing.group])
            source_rejections += [
                SourceRejection(listing.path(i), "unknown class", f"{listing.class_name(i)!r} is not in {options.classes}")
                for i in unknown
            ]
            listing = listing.select(known[listing.group])
        total_inputs = len(listing) + len(source_rejections)
        fingerprint = _fingerprint(source, listing, options, classes)
        log(f"dataprep: {len(listing)} inputs in {len(classes)} classes from {source}; "
            f"{len(source_rejections)} rejected while listing")

        if finished:
            manifest = json.loads(fs.cat_file(manifest_path))
            if manifest.get("fingerprint") != fingerprint:
                raise PrepError(f"{dest}: already holds a finished dataset made from other inputs or options")
            log(f"dataprep: {dest} is already complete ({manifest['total_samples']} samples); nothing to do")
            return manifest

        order = shuffled_order(len(listing), options.seed)
        per_shard = inputs_per_shard(listing, options)
        planned = max(1, math.ceil(len(listing) / per_shard))
        remove_stale_temporaries(fs, root)
        records = _finished_records(fs, root, fingerprint, planned, log)
        if records:
            log(f"dataprep: resuming: {len(records)} of {planned} shards already written")
        todo = [k for k in range(planned) if k not in records]
        if 0 < len(todo) < workers:
            log(f"dataprep: note: {len(todo)} shards for {workers} workers; smaller shards would use them all")
        # Tasks are made as the pool takes them: only a few shards' inputs exist as objects at once.
        tasks = (
            ShardTask(k, shard_name(options.split, k), dest, [
                (f"{i:010d}", listing.item(i), label_of[listing.class_name(i)])
                for i in order[k * per_shard:(k + 1) * per_shard].tolist()
            ])
            for k in todo
        )
        if observe is not None:  # after the fork: an observer may start threads (a metrics server)
            observe({"shard": None, "rejected": [asdict(r) for r in source_rejections]})
        remaining = sum(len(order[k * per_shard:(k + 1) * per_shard]) for k in todo)
        progress = Progress(len(listing), len(listing) - remaining, len(todo))
        collect(pool.imap_unordered(write_shard, tasks), fs, root, fingerprint, records, progress, observe)
    finally:
        pool.terminate()
        if progress is not None:
            progress.close()

    return finish(fs, root, dest, source, options, classes, [records[k] for k in range(planned)],
                  [asdict(r) for r in source_rejections], total_inputs, fingerprint, progress, log)


def collect(written, fs, root: str, fingerprint: str, records: dict, progress: Progress, observe) -> None:
    """Each shard's record as its worker finishes it: published under _progress/ (what a resumed
    run skips), kept in `records` by shard index, counted, shown to `observe`."""
    for record in written:
        record["fingerprint"] = fingerprint
        publish_bytes(fs, f"{root}/_progress/{record['index']:06d}.json", json.dumps(record).encode())
        records[record["index"]] = record
        progress.update(record.pop("inputs"), len(record["rejected"]))
        if observe is not None:
            observe(record)


def finish(fs, root: str, dest: str, source: str, options, classes: list[str], records: list[dict],
           source_rejections: list[dict], total_inputs: int, fingerprint: str, progress: Progress, log) -> dict:
    """Every shard is written: check the accounting, publish rejected.jsonl and then the
    manifest (the dataset's completion mark), and drop the progress records."""
    rejected = source_rejections + [r for record in records for r in record["rejected"]]
    shards = [record["shard"] for record in records if record["shard"] is not None]
    total_samples = sum(shard["samples"] for shard in shards)
    if total_samples + len(rejected) != total_inputs:  # the accounting must close
        raise PrepError(f"internal error: {total_samples} written + {len(rejected)} rejected != {total_inputs} inputs")
    publish_bytes(fs, f"{root}/rejected.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected).encode())
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": source,
        "split": options.split,
        "total_inputs": total_inputs,
        "total_samples": total_samples,
        "classes": classes,
        "shards": shards,
        "rejected": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "options": asdict(options),
        "fingerprint": fingerprint,
    }
    publish_bytes(fs, f"{root}/manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
    fs.rm(f"{root}/_progress", recursive=True)
    elapsed = time.monotonic() - progress.start
    reasons = ", ".join(f"{reason}: {count}" for reason, count in manifest["rejected"].items())
    log(
        f"dataprep: wrote {total_samples} samples in {len(shards)} shards "
        f"({sum(s['bytes'] for s in shards) / 2**20:.1f} MiB) to {dest}; rejected {len(rejected)}"
        f"{f' ({reasons})' if reasons else ''}; {elapsed:.1f}s, {progress.rate():.0f} img/s"
    )
    return manifest
