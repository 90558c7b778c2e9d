"""Turn a SOURCE into a sorted list of `Item`s, each readable by any worker on its own.

Supported layouts (SOURCE may be a local path or any fsspec URL):
  - ImageFolder: SOURCE/<class>/**/<file>
  - tar of per-class tars (ImageNet's ILSVRC2012_img_train.tar, the ImageNet-21K release):
    members <class>.tar, each holding that class's images; read in place, never unpacked
  - a folder or a tar of images plus a labels file (CSV with a `path,label` header, or JSONL
    with those keys), as for ImageNet's validation set

Inside a tar an item is a byte range, so workers seek straight to it. Inputs that cannot be
labelled are returned as rejections, so every input is accounted for.
"""
from __future__ import annotations

import csv
import io
import json
import posixpath
import tarfile
from dataclasses import dataclass

import fsspec


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
        filesystems[protocol] = fsspec.filesystem(protocol, **options_for(item.url, storage_options))
    fs = filesystems[protocol]
    return fs.cat_file(fs._strip_protocol(item.url), start=item.offset, end=item.offset + item.length)


def options_for(url: str, storage_options: dict) -> dict:
    """The S3 options apply to s3:// URLs only."""
    protocol = fsspec.utils.get_protocol(url)
    return storage_options if protocol in ("s3", "s3a") else {}


def _tar_members(fs, path: str) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file in a tar, read from headers only."""
    with fs.open(path, "rb", block_size=8 * 2**20) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def _from_tar_of_tars(fs, path: str, url: str):
    items, rejections = [], []
    with fs.open(path, "rb", block_size=8 * 2**20) as f, tarfile.open(fileobj=f, mode="r:") as outer:
        for member in outer:
            if not member.isfile():
                continue
            name = member.name
            if not name.endswith(".tar"):
                rejections.append(SourceRejection(f"{url}/{name}", "not in a class tar"))
                continue
            class_name = posixpath.basename(name)[: -len(".tar")]
            inner_file = outer.extractfile(member)
            with tarfile.open(fileobj=inner_file, mode="r:") as inner:
                for image in inner:
                    if image.isfile():
                        offset = member.offset_data + image.offset_data
                        items.append(Item(url, offset, image.size, f"{url}/{name}/{image.name}", class_name))
    return items, rejections


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
        with fsspec.open(labels_url, "rt", **options_for(labels_url, storage_options)) as f:
            text = f.read()
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
        for name, offset, size in _tar_members(fs, path):
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


def list_source(
    url: str, storage_options: dict, labels_url: str | None = None
) -> tuple[list[Item], list[SourceRejection]]:
    """Items sorted by (class, path) and the inputs rejected before any image is read."""
    fs, path = fsspec.core.url_to_fs(url, **options_for(url, storage_options))
    if not fs.exists(path):
        raise SourceError(f"{url}: SOURCE not found")
    is_tar = not fs.isdir(path)
    if is_tar and not path.endswith(".tar"):
        raise SourceError(f"{url}: SOURCE must be a folder or a .tar archive")
    if labels_url:
        items, rejections = _from_labelled(fs, path, url, _read_labels(labels_url, storage_options), is_tar)
    elif is_tar:
        items, rejections = _from_tar_of_tars(fs, path, url)
    else:
        items, rejections = _from_image_folder(fs, path, url)
    items.sort(key=lambda item: (item.class_name, item.path))
    rejections.sort(key=lambda r: r.path)
    return items, rejections
