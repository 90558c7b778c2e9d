"""Turn a SOURCE into a `Listing` of its inputs, each readable by any worker on its own.

Supported layouts (SOURCE may be a local path or any fsspec URL):
  - ImageFolder: SOURCE/<class>/**/<file>
  - tar of per-class tars (ImageNet's ILSVRC2012_img_train.tar, the ImageNet-21K release):
    members <class>.tar, each holding that class's images; read in place, never unpacked
  - a folder or a tar of images plus a labels file (CSV with a `path,label` header, or JSONL
    with those keys), as for ImageNet's validation set

Inside a tar an item is a byte range, so workers seek straight to it. Inputs that cannot be
labelled are returned as rejections, so every input is accounted for.

A tar of tars is listed in two steps: one pass over the outer archive's headers (small ranged
reads, never its data), then each inner tar is listed by a worker reading only its byte range,
in parallel. Both steps save what they found under DEST/_progress/listing/, and the finished
listing is saved whole (`listing.npz`), so a rerun after a crash lists nothing again.

A `Listing` holds its items in columns, not as objects: about 20 bytes per item plus the
item's file name (benchmarks/listing_memory.py), so 14M inputs fit in well under 1 GiB.
"""
from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import tarfile
from array import array
from dataclasses import dataclass

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from coatnet_scale.storage import RangeReader, url_to_fs, write_atomic


@dataclass(frozen=True)
class Item:
    url: str  # the file holding the bytes: the image itself, or a tar containing it
    offset: int  # the image's byte range within `url`
    length: int
    path: str  # human-readable source path, reported in the sample's json and in rejections
    class_name: str


@dataclass(frozen=True)
class SourceRejection:
    path: str
    reason: str
    detail: str = ""


class SourceError(ValueError):
    """The SOURCE itself is unusable (missing, wrong layout, bad labels file)."""


def read_item(item: Item, filesystems: dict, storage_options: dict) -> bytes:
    """Read an item's bytes, reusing one filesystem per protocol in this process."""
    protocol = fsspec.utils.get_protocol(item.url)
    if protocol not in filesystems:
        filesystems[protocol] = url_to_fs(item.url, storage_options)[0]
    fs = filesystems[protocol]
    return fs.cat_file(fs._strip_protocol(item.url), start=item.offset, end=item.offset + item.length)


class Listing:
    """A SOURCE's items sorted by (class, path), in columns. Items fall into groups (a class,
    or one inner tar of a tar of tars) that share a class and a path prefix; an item's path is
    `path_prefix` + its group's prefix + its name, and its bytes are `offset`, `length` in the
    source tar (`in_tar`) or in the file `base_url`/its path."""

    def __init__(self, source: str, base_url: str, in_tar: bool, path_prefix: str, groups: list[tuple[str, str]],
                 group: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, names: bytes, ends: np.ndarray):
        self.source, self.base_url, self.in_tar, self.path_prefix = source, base_url, in_tar, path_prefix
        self.groups = groups  # (prefix, class name)
        self.group, self.offsets, self.lengths, self.names, self.ends = group, offsets, lengths, names, ends

    @classmethod
    def from_items(cls, source: str, base_url: str, in_tar: bool, items: list[Item]) -> Listing:
        items = sorted(items, key=lambda item: (item.class_name, item.path))
        groups = sorted({item.class_name for item in items})
        number = {name: g for g, name in enumerate(groups)}
        encoded = [item.path.encode() for item in items]
        return cls(
            source, base_url, in_tar, "", [("", name) for name in groups],
            np.array([number[item.class_name] for item in items], dtype=np.int32),
            np.array([item.offset for item in items], dtype=np.int64),
            np.array([item.length for item in items], dtype=np.int64),
            b"".join(encoded), np.cumsum([len(e) for e in encoded], dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.offsets)

    def class_name(self, i: int) -> str:
        return self.groups[self.group[i]][1]

    def path(self, i: int) -> str:
        start = self.ends[i - 1] if i else 0
        return self.path_prefix + self.groups[self.group[i]][0] + self.names[start:self.ends[i]].decode()

    def item(self, i: int) -> Item:
        path = self.path(i)
        url = self.source if self.in_tar else f"{self.base_url}/{path}"
        return Item(url, int(self.offsets[i]), int(self.lengths[i]), path, self.class_name(i))

    def select(self, keep: np.ndarray) -> Listing:
        starts = np.concatenate([[0], self.ends[:-1]])
        kept = np.flatnonzero(keep)
        names = b"".join(self.names[starts[i]:self.ends[i]] for i in kept)
        return Listing(self.source, self.base_url, self.in_tar, self.path_prefix, self.groups, self.group[kept],
                       self.offsets[kept], self.lengths[kept], names, np.cumsum(self.ends[kept] - starts[kept]))

    def save(self, f, rejections: list[SourceRejection], key: dict) -> None:
        """Write the listing to a binary file object (numpy's npz: arrays stream out in chunks)."""
        meta = {"key": key, "source": self.source, "base_url": self.base_url, "in_tar": self.in_tar,
                "path_prefix": self.path_prefix, "groups": self.groups,
                "rejections": [[r.path, r.reason, r.detail] for r in rejections]}
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), group=self.group, offsets=self.offsets,
                 lengths=self.lengths, names=np.frombuffer(self.names, np.uint8), ends=self.ends)

    @classmethod
    def from_bytes(cls, data: bytes, key: dict) -> tuple[Listing, list[SourceRejection]] | None:
        """The saved listing, or None if it was made for another SOURCE."""
        with np.load(io.BytesIO(data)) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta["key"] != key:
                return None
            listing = cls(meta["source"], meta["base_url"], meta["in_tar"], meta["path_prefix"],
                          [tuple(g) for g in meta["groups"]], z["group"], z["offsets"], z["lengths"],
                          z["names"].tobytes(), z["ends"])
        return listing, [SourceRejection(*r) for r in meta["rejections"]]


class SavedListing:
    """The listing's progress files under DEST/_progress/listing/ (absent when `fs` is None)."""

    def __init__(self, fs=None, folder: str = ""):
        self.fs, self.folder = fs, folder

    def get(self, name: str) -> bytes | None:
        if self.fs is None:
            return None
        try:
            return self.fs.cat_file(f"{self.folder}/{name}")
        except FileNotFoundError:
            return None

    def names(self, folder: str) -> set[str]:
        """The file names in a sub-folder, by one listing."""
        if self.fs is None or not self.fs.exists(f"{self.folder}/{folder}"):
            return set()
        return {posixpath.basename(p) for p in self.fs.ls(f"{self.folder}/{folder}", detail=False)}

    def put(self, name: str, data: bytes) -> None:
        if self.fs is not None:
            write_atomic(self.fs, f"{self.folder}/{name}", data)

    def write(self, name: str, save) -> None:
        """Publish a large file whole, written by `save(f)` without a copy in memory: a temporary
        file renamed on a filesystem, one upload on an object store."""
        if self.fs is None:
            return
        path = f"{self.folder}/{name}"
        if not isinstance(self.fs, LocalFileSystem):
            with self.fs.open(path, "wb") as f:
                save(f)
            return
        os.makedirs(self.folder, exist_ok=True)
        temporary = f"{self.folder}/.partial-{name}"
        with open(temporary, "wb") as f:
            save(f)
        os.replace(temporary, path)

    def clear_parts(self) -> None:
        """The per-step files, once the whole listing is saved."""
        if self.fs is not None and self.fs.exists(f"{self.folder}/parts"):
            self.fs.rm(f"{self.folder}/parts", recursive=True)


def list_outer_tar(fs, path: str) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file in a tar, from its headers alone: small
    ranged reads that skip each member's data."""
    with fs.open(path, "rb", block_size=2**14) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def list_inner_tar(fs, path: str, offset: int, size: int) -> tuple[list[str], list[int], list[int]]:
    """(names, data offsets in the outer file, sizes) of the regular files of the tar stored at
    bytes [offset, offset + size) of `path`, sorted by name; one sequential ranged read."""
    found = []
    with RangeReader(fs, path, offset, offset + size) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            tar.members = []
            if member.isfile():
                found.append((member.name, offset + member.offset_data, member.size))
    found.sort()
    return [f[0] for f in found], [f[1] for f in found], [f[2] for f in found]


def inner_part(names: list[str], offsets: list[int], sizes: list[int]) -> tuple:
    """One inner tar's listing, compact for the trip to the driver and for saving: (names
    joined, name lengths, offsets, sizes)."""
    encoded = [name.encode() for name in names]
    return (b"".join(encoded), np.array([len(e) for e in encoded], np.uint16), np.array(offsets, np.int64),
            np.array(sizes, np.int64))


def _part_bytes(part: tuple) -> bytes:
    out = io.BytesIO()
    np.savez(out, names=np.frombuffer(part[0], np.uint8), lengths=part[1], offsets=part[2], sizes=part[3])
    return out.getvalue()


def _part_from_bytes(data: bytes) -> tuple:
    with np.load(io.BytesIO(data)) as z:
        return z["names"].tobytes(), z["lengths"], z["offsets"], z["sizes"]


def _from_tar_of_tars(fs, path: str, url: str, map_inner, saved: SavedListing, log):
    outer = saved.get("parts/outer.json")
    if outer is None:
        members = list_outer_tar(fs, path)
        saved.put("parts/outer.json", json.dumps(members).encode())
    else:
        members = json.loads(outer)
    rejections = [SourceRejection(f"{url}/{name}", "not in a class tar") for name, _, _ in members if not name.endswith(".tar")]
    inner = sorted((posixpath.basename(name)[: -len(".tar")], name, offset, size)
                   for name, offset, size in members if name.endswith(".tar"))
    done = saved.names("parts")
    todo = [(k, url, offset, size) for k, (_, _, offset, size) in enumerate(inner) if f"{k:06d}.npz" not in done]
    if len(todo) < len(inner):
        log(f"dataprep: listing: {len(inner) - len(todo)} of {len(inner)} inner tars already listed")
    # Columns grow in place, in archive order (map_inner keeps its tasks' order), so the peak
    # stays near the finished listing's own size.
    names, name_lengths, offsets, lengths, group = bytearray(), array("H"), array("q"), array("I"), array("i")
    listed = iter(map_inner(todo))
    for k in range(len(inner)):
        if f"{k:06d}.npz" in done:
            part = _part_from_bytes(saved.get(f"parts/{k:06d}.npz"))
        else:
            number, *part = next(listed)
            assert number == k, (number, k)
            saved.put(f"parts/{k:06d}.npz", _part_bytes(part))
        names += part[0]
        name_lengths.frombytes(part[1].astype(np.uint16).tobytes())
        offsets.frombytes(part[2].astype(np.int64).tobytes())
        if len(part[3]) and part[3].max() >= 2**32:
            raise SourceError(f"{url}: {inner[k][1]} holds a member of 4 GiB or more, not an image")
        lengths.frombytes(part[3].astype(np.uint32).tobytes())
        group.frombytes(np.full(len(part[2]), k, np.int32).tobytes())
    ends = np.cumsum(np.frombuffer(name_lengths, np.uint16), dtype=np.uint32 if len(names) < 2**32 else np.int64)
    groups = [(f"{name}/", class_name) for class_name, name, _, _ in inner]
    listing = Listing(url, url, True, f"{url}/", groups, np.frombuffer(group, np.int32), np.frombuffer(offsets, np.int64),
                      np.frombuffer(lengths, np.uint32), names, ends)
    return listing, rejections


def list_inner(task: tuple[int, str, int, int], storage_options: dict) -> tuple:
    """(k, *inner_part) of the inner tar at bytes [offset, offset + size) of url, for task
    (k, url, offset, size): one step of a tar of tars' listing, in any process."""
    k, url, offset, size = task
    fs, path = url_to_fs(url, storage_options)
    return (k, *inner_part(*list_inner_tar(fs, path, offset, size)))


def list_inner_tars_here(storage_options: dict):
    """map_inner for listing in this process."""
    return lambda tasks: (list_inner(task, storage_options) for task in tasks)


def list_source(
    url: str, storage_options: dict, labels_url: str | None = None, map_inner=None, saved: SavedListing | None = None,
    log=print,
) -> tuple[Listing, list[SourceRejection]]:
    """The inputs sorted by (class, path) and the inputs rejected before any image is read.
    `map_inner` lists the inner tars of a tar of tars (default: in this process); `saved`
    keeps the listing's progress and the finished listing for a rerun."""
    saved = saved or SavedListing()
    fs, path = url_to_fs(url, storage_options)
    if not fs.exists(path):
        raise SourceError(f"{url}: SOURCE not found")
    is_tar = not fs.isdir(path)
    if is_tar and not path.endswith(".tar"):
        raise SourceError(f"{url}: SOURCE must be a folder or a .tar archive")
    key = {"source": url, "labels": labels_url, "bytes": fs.size(path) if is_tar else None}
    data = saved.get("listing.npz")
    found = Listing.from_bytes(data, key) if data is not None else None
    if found is not None:
        log(f"dataprep: reusing the saved listing of {url} ({len(found[0])} inputs)")
        return found
    if labels_url:
        items, rejections = _from_labelled(fs, path, url, _read_labels(labels_url, storage_options), is_tar)
        listing = Listing.from_items(url, url if is_tar else fs.unstrip_protocol(path), is_tar, items)
    elif is_tar:
        listing, rejections = _from_tar_of_tars(fs, path, url, map_inner or list_inner_tars_here(storage_options), saved, log)
    else:
        items, rejections = _from_image_folder(fs, path, url)
        listing = Listing.from_items(url, fs.unstrip_protocol(path), False, items)
    rejections.sort(key=lambda r: r.path)
    saved.write("listing.npz", lambda f: listing.save(f, rejections, key))
    saved.clear_parts()
    return listing, rejections


def _from_image_folder(fs, path: str, url: str):
    items, rejections = [], []
    for file_path, info in sorted(fs.find(path, detail=True).items()):
        relative = posixpath.relpath(file_path, path)
        if "/" not in relative:
            rejections.append(SourceRejection(relative, "not in a class folder"))
            continue
        full_url = fs.unstrip_protocol(file_path)
        items.append(Item(full_url, 0, info["size"], relative, relative.split("/", 1)[0]))
    if not items and not rejections:
        raise SourceError(f"{url}: no files found; expected one sub-folder per class")
    return items, rejections


def _read_labels(labels_url: str, storage_options: dict) -> dict[str, str]:
    try:
        fs, path = url_to_fs(labels_url, storage_options)
        text = fs.cat_file(path).decode()
    except FileNotFoundError:
        raise SourceError(f"{labels_url}: labels file not found") from None
    labels: dict[str, str] = {}
    if labels_url.endswith((".jsonl", ".json")):
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                labels[row["path"]] = str(row["label"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SourceError(f"{labels_url}:{number}: expected {{\"path\": ..., \"label\": ...}}: {e}") from None
    else:
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise SourceError(f"{labels_url}: expected a CSV header with columns path,label; got {reader.fieldnames}")
        for row in reader:
            labels[row["path"]] = row["label"]
    if not labels:
        raise SourceError(f"{labels_url}: no labels found")
    return labels


def _from_labelled(fs, path: str, url: str, labels: dict[str, str], is_tar: bool):
    found: list[tuple[str, str, int, int]] = []  # (relative path, file url, offset, length)
    if is_tar:
        for name, offset, size in zip(*list_inner_tar(fs, path, 0, fs.size(path))):
            found.append((name, url, offset, size))
    else:
        for file_path, info in sorted(fs.find(path, detail=True).items()):
            found.append((posixpath.relpath(file_path, path), fs.unstrip_protocol(file_path), 0, info["size"]))
    items, rejections = [], []
    for relative, file_url, offset, length in found:
        label = labels.get(relative)
        if label is None:
            rejections.append(SourceRejection(relative, "no label", "not listed in the labels file"))
        else:
            items.append(Item(file_url, offset, length, relative, label))
    present = {relative for relative, *_ in found}
    for missing in sorted(set(labels) - present):
        rejections.append(SourceRejection(missing, "missing file", "listed in the labels file, not in SOURCE"))
    return items, rejections
