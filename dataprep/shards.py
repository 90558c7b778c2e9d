"""Shard files: deterministic tar writing, atomic publication on any fsspec store, verification.

A shard is built in a local file and becomes visible under its final name only when complete:
a rename on a local filesystem, one finished upload (single PUT or completed multipart upload)
on an object store. The same samples always give the same bytes (fixed mtime, owner, mode).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile

from fsspec.implementations.local import LocalFileSystem

from coatnet_scale.storage import file_sha256, url_to_fs
from coatnet_scale.shard_format import SampleError, encode_offsets, iter_samples, labeller, read_members


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def offsets_name(shard: str) -> str:
    return shard.removesuffix(".tar") + ".idx"


class ShardWriter:
    """Appends samples ({key}.cls, {key}.jpg, {key}.json) to a deterministic tar on local disk,
    noting where each sample starts (`offsets`, then the end of the last: coatnet_scale/shard_format.py)."""

    def __init__(self, directory: str):
        fd, self.path = tempfile.mkstemp(dir=directory, prefix=".shard-", suffix=".tmp")
        self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0
        self.offsets: list[int] = []

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, image: bytes, label: int, meta: dict, ext: str = "jpg") -> None:
        self.offsets.append(self._tar.offset)
        self._add(f"{key}.cls", str(label).encode())
        self._add(f"{key}.{ext}", image)
        self._add(f"{key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
        self.samples += 1

    def close(self) -> tuple[int, str]:
        """Finish the tar; return (size, sha256)."""
        self.offsets.append(self._tar.offset)
        self._tar.close()
        self._file.close()
        return os.path.getsize(self.path), file_sha256(self.path)

    def discard(self) -> None:
        self._file.close()
        if os.path.exists(self.path):
            os.remove(self.path)


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def staging_directory(fs, root: str) -> str:
    """Where shards are built: inside DEST on a local filesystem (so publishing is a rename),
    the system temp directory otherwise."""
    return root if is_local(fs) else tempfile.gettempdir()


def publish_file(fs, local_path: str, dest_path: str) -> None:
    """Make local_path visible at dest_path all at once, and remove local_path."""
    if is_local(fs):
        os.chmod(local_path, 0o644)  # mkstemp's 0600 would hide shards from other readers
        os.replace(local_path, dest_path)
    else:
        fs.put_file(local_path, dest_path)
        os.remove(local_path)


def publish_bytes(fs, dest_path: str, data: bytes) -> None:
    if is_local(fs):
        os.makedirs(os.path.dirname(dest_path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest_path), prefix=".write-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish_file(fs, tmp, dest_path)
    else:
        fs.pipe_file(dest_path, data)


def remove_stale_temporaries(fs, root: str) -> None:
    """Temporary files left by a killed run (local destinations only; object stores have none)."""
    if not is_local(fs):
        return
    for directory in (root, os.path.join(root, "_progress")):
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if name.startswith((".shard-", ".write-")) and name.endswith(".tmp"):
                os.remove(os.path.join(directory, name))


def verify_dataset(dest: str, storage_options: dict, progress=print) -> list[str]:
    """Re-read every shard named in DEST/manifest.json (one made by dataprep or by `dataprep
    index`); return a list of differences (empty: all good): size, sha256, sample count, each
    counted sample's image and label, and the offsets file."""
    fs, root = url_to_fs(dest, storage_options)
    root = root.rstrip("/")
    manifest_path = f"{root}/manifest.json"
    if not fs.exists(manifest_path):
        return [f"{dest}/manifest.json: missing (the dataset is incomplete or DEST is wrong)"]
    manifest = json.loads(fs.cat_file(manifest_path))
    label_of = labeller(manifest.get("labels"), manifest["classes"])
    wanted = read_members(manifest.get("labels"))
    problems = []
    total = 0
    for number, shard in enumerate(manifest["shards"], 1):
        name = shard["name"]
        shard_fs, path = url_to_fs(shard["url"], storage_options) if "url" in shard else (fs, f"{root}/{name}")
        if not shard_fs.exists(path):
            problems.append(f"{name}: missing")
            continue
        rejected = set(shard.get("rejected_keys", ()))
        digest, offsets, unusable = hashlib.sha256(), [], []
        with shard_fs.open(path, "rb") as f:
            hashing = HashingReader(f, digest)
            try:
                for sample in iter_samples(hashing, wanted):
                    if sample["__key__"] in rejected:
                        continue
                    try:
                        label_of(sample)
                    except SampleError as e:
                        unusable.append(f"{sample['__key__']} ({e})")
                    offsets.append(sample["__start__"])
                    end = sample["__end__"]
            except tarfile.TarError as e:
                problems.append(f"{name}: not a readable tar: {e}")
                continue
            hashing.drain()
        if hashing.size != shard["bytes"]:
            problems.append(f"{name}: {hashing.size} bytes, manifest says {shard['bytes']}")
        if digest.hexdigest() != shard["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
        if len(offsets) != shard["samples"]:
            problems.append(f"{name}: {len(offsets)} samples, manifest says {shard['samples']}")
        if unusable:
            problems.append(f"{name}: samples without an image or a usable label: {unusable[:5]}")
        if shard.get("offsets") and offsets:
            recorded = fs.cat_file(f"{root}/{shard['offsets']}")
            if recorded != encode_offsets([*offsets, end]):
                problems.append(f"{name}: {shard['offsets']} does not match the shard's sample offsets")
        total += len(offsets)
        progress(f"verify: {number}/{len(manifest['shards'])} {name}: {len(offsets)} samples")
    if total != manifest["total_samples"] and not problems:
        problems.append(f"{total} samples in shards, manifest says {manifest['total_samples']}")
    return problems


class HashingReader:
    """A read-only stream that hashes and counts everything read through it."""

    def __init__(self, f, digest):
        self._f, self._digest, self.size, self.head = f, digest, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._digest.update(data)
        if self.size < 8:
            self.head += data[:8 - self.size]
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(2**20):
            pass
