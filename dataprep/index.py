"""`python -m dataprep index SHARDS... DEST`: a manifest for webdataset shards that already exist
(made by img2dataset, webdataset's ShardWriter, or published in that layout), so the training
loader reads them where they are, without decoding and re-encoding 14M images first.

Each shard is read once, start to end, by a worker process (or a CPU of a Ray cluster with
--ray): its size and sha256, its samples (coatnet_scale/shard_format.py) with their byte offsets, and
their labels, from `.cls` or from a field of `.json` (--label-key). A sample without an image
or a usable label is rejected with its shard and key (and with --verify, one whose image does
not decode); the manifest counts the rest and lists the rejected keys per shard, which the
loader passes over. A shard that cannot be read is reported and left out, by name.

DEST gets manifest.json, rejected.jsonl and offsets/NNNNNN.idx (one per uncompressed shard);
the shards are never rewritten. As with sharding, each finished shard's record goes to
DEST/_progress/, so a rerun after a crash reads only the shards not yet indexed.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import posixpath
import tarfile
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass

from braceexpand import braceexpand
from PIL import Image

from coatnet_scale.storage import url_to_fs
from dataprep import prep
from dataprep.images import ImageOptions
from coatnet_scale.shard_format import SampleError, encode_offsets, image_member, iter_samples, label_index, raw_label, read_members
from dataprep.shards import HashingReader, publish_bytes

INDEX_FORMAT = "coatnet_scale.dataprep.index/1"
COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd
UNREADABLE = (FileNotFoundError, PermissionError, IsADirectoryError, tarfile.TarError, EOFError, zlib.error,
              gzip.BadGzipFile, lzma.LZMAError)
READ_ATTEMPTS = 4


@dataclass(frozen=True)
class IndexOptions:
    label_key: str | None = None  # a .json field; None: labels from .cls
    classes: str | None = None  # a manifest.json or a text file: fixes the class list and its order
    verify: bool = False  # decode every image now, rejecting those that fail

    @property
    def labels(self) -> dict:
        return {"member": "json", "key": self.label_key} if self.label_key else {"member": "cls"}


def expand_shards(patterns: list[str]) -> list[str]:
    """Brace patterns (train-{000000..002047}.tar) and plain URLs, in order; local paths made absolute."""
    urls = [url for pattern in patterns for url in braceexpand(pattern)]
    return [url if "://" in url else os.path.abspath(url) for url in urls]


@dataclass(frozen=True)
class IndexTask:
    index: int
    url: str
    dest: str
    labels: dict
    classes: list[str] | None
    verify: bool


def _scan(task: IndexTask, fs, path: str) -> dict:
    rule = task.labels
    index = {name: number for number, name in enumerate(task.classes or [])}
    digest, starts, end, rejected, names, top = hashlib.sha256(), [], 0, [], set(), -1
    with fs.open(path, "rb", block_size=8 * 2**20) as f:
        hashing = HashingReader(f, digest)
        for sample in iter_samples(hashing, read_members(rule)):
            key = sample["__key__"]
            try:
                image = image_member(sample)
                value = raw_label(sample, rule)
                if task.classes is not None:
                    label_index(value, task.classes, index)
                if task.verify:
                    try:
                        Image.open(io.BytesIO(sample[image])).load()
                    except Exception as e:
                        raise SampleError("undecodable", f".{image}: {type(e).__name__}: {e}") from None
            except SampleError as e:
                rejected.append({"shard": task.url, "key": key, "reason": e.reason, "detail": e.detail})
                continue
            starts.append(sample["__start__"])
            end = sample["__end__"]
            if isinstance(value, str):
                names.add(value)
            else:
                top = max(top, value)
        hashing.drain()
    return {"digest": digest.hexdigest(), "bytes": hashing.size, "starts": starts, "end": end, "rejected": rejected,
            "names": sorted(names), "top": top, "compressed": hashing.head.startswith(COMPRESSED)}


def index_shard(task: IndexTask) -> dict:
    """Read one shard; publish its offsets file; return its progress record (sans fingerprint)."""
    storage_options = prep._worker["storage_options"]
    for attempt in range(READ_ATTEMPTS):
        try:
            fs, path = url_to_fs(task.url, storage_options)
            scan = _scan(task, fs, path)
            break
        except UNREADABLE as e:
            return {"index": task.index, "url": task.url, "error": f"{type(e).__name__}: {e}"}
        except OSError as e:  # throttling, resets, timeouts: retried, then the run fails and a rerun resumes
            if attempt == READ_ATTEMPTS - 1:
                raise OSError(f"{task.url}: read failed {READ_ATTEMPTS} times, last: {type(e).__name__}: {e}") from e
            time.sleep(0.5 * 2**attempt)
    offsets = None
    if scan["starts"] and not scan["compressed"]:  # offsets into a compressed stream allow no ranged read
        offsets = f"offsets/{task.index:06d}.idx"
        dest_fs, root = prep.open_dest(task.dest, storage_options)
        publish_bytes(dest_fs, f"{root}/{offsets}", encode_offsets([*scan["starts"], scan["end"]]))
    shard = {"name": posixpath.basename(task.url), "url": task.url, "samples": len(scan["starts"]),
             "bytes": scan["bytes"], "sha256": scan["digest"], "offsets": offsets,
             "rejected_keys": [r["key"] for r in scan["rejected"]]}
    return {"index": task.index, "url": task.url, "shard": shard, "rejected": scan["rejected"],
            "names": scan["names"], "top": scan["top"]}


def _class_list(records: list[dict], fixed: list[str] | None) -> list[str]:
    if fixed is not None:
        return fixed
    names = sorted({name for r in records for name in r["names"]})
    top = max((r["top"] for r in records), default=-1)
    if names and top >= 0:
        raise prep.PrepError("labels mix integers and class names; give the class list with --classes")
    if names:
        return prep.sort_class_names(names)
    return [str(i) for i in range(top + 1)]


def _finished(fs, root: str, fingerprint: str, count: int) -> dict[int, dict]:
    records = {}
    for record in prep.progress_records(fs, root, fingerprint, "index of other shards or options"):
        offsets = (record.get("shard") or {}).get("offsets")
        if "error" not in record and record["index"] < count and (not offsets or fs.exists(f"{root}/{offsets}")):
            records[record["index"]] = record
    return records


def index_shards(patterns: list[str], dest: str, options: IndexOptions, workers: int, ray_address: str | None = None,
                 storage_options: dict | None = None, log=print) -> dict:
    """Index existing shards into DEST/manifest.json; return the manifest. Safe to rerun after a crash."""
    storage_options = storage_options or {}
    urls = expand_shards(patterns)
    if not urls:
        raise prep.PrepError("no shards given")
    fs, root = prep.open_dest(dest, storage_options)
    fs.makedirs(root, exist_ok=True)
    fixed = prep.read_classes(options.classes, storage_options) if options.classes else None
    fingerprint = hashlib.sha256(json.dumps([urls, asdict(options), fixed], sort_keys=True).encode()).hexdigest()
    manifest_path = f"{root}/manifest.json"
    if fs.exists(manifest_path):
        manifest = json.loads(fs.cat_file(manifest_path))
        if manifest.get("fingerprint") != fingerprint:
            raise prep.PrepError(f"{dest}: already holds a manifest made from other shards or options")
        log(f"dataprep: {dest} is already complete ({manifest['total_samples']} samples); nothing to do")
        return manifest
    records = _finished(fs, root, fingerprint, len(urls))
    if records:
        log(f"dataprep: index: resuming: {len(records)} of {len(urls)} shards already read")
    tasks = [IndexTask(k, url, dest, options.labels, fixed, options.verify) for k, url in enumerate(urls) if k not in records]
    log(f"dataprep: index: reading {len(tasks)} shards with {workers} workers{' on Ray' if ray_address is not None else ''}")
    pool = prep._make_pool(workers, ray_address, (ImageOptions(), storage_options))
    start = last = time.monotonic()
    try:
        for record in pool.imap_unordered(index_shard, tasks):
            record["fingerprint"] = fingerprint
            publish_bytes(fs, f"{root}/_progress/{record['index']:06d}.json", json.dumps(record).encode())
            records[record["index"]] = record
            if "error" in record:
                log(f"dataprep: index: cannot read {record['url']}: {record['error']}; leaving it out")
            if time.monotonic() - last > 10 or len(records) == len(urls):
                last = time.monotonic()
                log(f"dataprep: index: {len(records)}/{len(urls)} shards read")
    finally:
        pool.terminate()

    ordered = [records[k] for k in range(len(urls))]
    readable = [r for r in ordered if "error" not in r]
    unreadable = [{"url": r["url"], "error": r["error"]} for r in ordered if "error" in r]
    classes = _class_list(readable, fixed)
    rejected = [r for record in readable for r in record["rejected"]]
    rejected += [{"shard": u["url"], "key": None, "reason": "unreadable shard", "detail": u["error"]} for u in unreadable]
    shards = [r["shard"] for r in readable if r["shard"]["samples"]]
    total = sum(s["samples"] for s in shards)
    publish_bytes(fs, f"{root}/rejected.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected).encode())
    manifest = {
        "format": INDEX_FORMAT, "source": patterns, "labels": options.labels, "classes": classes, "shards": shards,
        "total_samples": total, "rejected": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "unreadable": unreadable, "options": asdict(options), "fingerprint": fingerprint,
    }
    publish_bytes(fs, manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    fs.rm(f"{root}/_progress", recursive=True)
    reasons = ", ".join(f"{n} {reason}" for reason, n in manifest["rejected"].items() if reason != "unreadable shard")
    log(f"dataprep: index: {total} samples in {len(shards)} shards, {len(classes)} classes; "
        f"{len(rejected) - len(unreadable)} samples rejected{f' ({reasons})' if reasons else ''}; "
        f"{len(unreadable)} unreadable shards; {time.monotonic() - start:.1f}s; wrote {dest}/manifest.json")
    return manifest
