"""What a sample is inside a webdataset shard, for every reader of shards: dataprep's indexer
and verifier, and the training loader (coatnet_scale.data). One definition, so that the sample
counts an index writes are the samples the loader later finds. It lives beside storage, at
the bottom of the package, so that the trainer reads shards without importing the sharder.

A shard is an uncompressed (or gzip/bz2/xz) tar. Members are grouped into samples as webdataset
groups them: the key is the member's path up to the first dot of its file name, the rest is
the extension (lower-cased); a sample ends where the key changes or an extension repeats.
Directories, links and `__meta__` files belong to no sample.

Byte offsets. For an uncompressed shard an offsets file lists, as little-endian uint64, the
byte position of the first header of each sample the manifest counts, then the end of the last
one: N + 1 numbers. Bytes [offsets[a], offsets[b]) hold samples a .. b-1 (and any samples the
manifest lists as rejected between them), so a reader can fetch exactly the samples it needs.

Labels come from the `.cls` member (an integer), or from a field of the `.json` member (an
integer, or a class name looked up in the manifest's class list).
"""
from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Callable, Iterator

import numpy as np

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")
BLOCK = tarfile.BLOCKSIZE


class SampleError(ValueError):
    """A sample the manifest cannot count: `reason` is one of a small fixed vocabulary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def iter_samples(fileobj, wanted: Callable[[str], bool] = lambda ext: True, base: int = 0,
                 mode: str = "r|*") -> Iterator[dict]:
    """Samples of a tar stream, in order: {"__key__", "__start__", "__end__", ext: bytes, ...},
    with the bytes of the `wanted` extensions only; offsets are `base` + position in the stream.
    Mode "r|" (uncompressed) reads headers with `_plain_members`, any other with tarfile."""
    current: dict | None = None
    seen: set[str] = set()
    members = _plain_members(fileobj, wanted) if mode == "r|" else _tarfile_members(fileobj, wanted, mode)
    for name, start, end, data in members:
        if _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
            continue
        match = _NAME.match(name)
        if not match:
            continue
        key, ext = match.group(1), match.group(2).lower()
        if current is None or key != current["__key__"] or ext in seen:
            if current is not None:
                yield current
            current, seen = {"__key__": key, "__start__": base + start}, set()
        seen.add(ext)
        if data is not None:
            current[ext] = data
        current["__end__"] = base + end
    if current is not None:
        yield current


def _wants(wanted: Callable[[str], bool], name: str) -> bool:
    match = _NAME.match(name)
    return bool(match) and wanted(match.group(2).lower())


def _tarfile_members(fileobj, wanted, mode: str) -> Iterator[tuple[str, int, int, bytes | None]]:
    """(name, first header byte, end of data blocks, bytes if wanted) of each regular file."""
    with tarfile.open(fileobj=fileobj, mode=mode) as tar:
        for member in tar:
            tar.members = []  # a stream reader keeps every header otherwise
            if member.isreg():
                data = tar.extractfile(member).read() if _wants(wanted, member.name) else None
                yield member.name, member.offset, member.offset_data + -(-member.size // BLOCK) * BLOCK, data


def _plain_members(fileobj, wanted) -> Iterator[tuple[str, int, int, bytes | None]]:
    """`_tarfile_members` for an uncompressed stream, which may end at a member boundary
    instead of an end-of-archive block. Plain ustar headers of regular files, the usual case,
    are read here; any other header by tarfile.TarInfo.frombuf, with GNU long names and pax
    path and size records applied as tarfile applies them. A third of the loader's time
    outside decoding and augmentation went to tarfile's stream machinery."""
    position, start, long_name, pax, global_pax = 0, None, None, {}, {}
    while True:
        header = fileobj.read(BLOCK)
        if not header or header.count(0) == BLOCK:
            if start is not None:
                raise tarfile.ReadError("unexpected end of data after an extended header")
            return
        if len(header) != BLOCK:
            raise tarfile.ReadError("unexpected end of data")
        start = position if start is None else start
        position += BLOCK
        plain = _plain_header(header) if not (long_name or pax or global_pax) else None
        if plain is not None:
            name, size, regular = *plain, True
        else:
            try:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                if position == BLOCK:
                    raise tarfile.ReadError(str(e)) from None
                return  # as tarfile ends a stream at a damaged header (the reader counts what is missing)
            if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, *_PAX_TYPES):
                blocks = -(-info.size // BLOCK) * BLOCK
                data = _read_exactly(fileobj, blocks)[:info.size]
                position += blocks
                if info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = tarfile.nts(data, "utf-8", "surrogateescape")
                elif info.type in _PAX_TYPES:
                    (global_pax if info.type == tarfile.XGLTYPE else pax).update(_pax_records(data))
                continue
            if info.type == tarfile.GNUTYPE_SPARSE:
                raise tarfile.ReadError(f"{info.name}: sparse tar members are not supported")
            name = pax.get("path") or long_name or info.name
            regular = info.isreg()
            size = int(pax.get("size", global_pax.get("size", info.size)))
            if not regular and info.type in tarfile.SUPPORTED_TYPES:
                size = 0  # directories, links, devices: no data blocks follow
        blocks = -(-size // BLOCK) * BLOCK
        data = None
        if regular and _wants(wanted, name):
            data = _read_exactly(fileobj, blocks)[:size]
        elif blocks:
            _read_exactly(fileobj, blocks)
        position += blocks
        if regular:
            yield name, start, position, data
        start, long_name, pax = None, None, {}


def _plain_header(header: bytes) -> tuple[str, int] | None:
    """(name, size) of a ustar header of a regular file with a valid checksum and an octal size,
    as tarfile.TarInfo.frombuf reads it; None for anything else."""
    kind = header[156:157]
    if kind != tarfile.REGTYPE and kind != tarfile.AREGTYPE or header[124] & 0x80:
        return None
    try:
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if checksum != 256 + sum(header) - sum(header[148:156]):
        return None
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if prefix:
        name = f"{prefix}/{name}"
    if kind == tarfile.AREGTYPE and name.endswith("/"):
        return None  # an old-style directory
    return name, size


_PAX_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")


def _pax_records(data: bytes) -> dict[str, str]:
    records, position = {}, 0
    while match := _PAX_RECORD.match(data, position):
        length = int(match.group(1))
        if length == 0:
            raise tarfile.ReadError("invalid pax header")
        value = data[match.end(2) + 1:match.start(1) + length - 1]
        records[match.group(2).decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def _read_exactly(fileobj, size: int) -> bytes:
    data = fileobj.read(size)
    if len(data) != size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def image_member(sample: dict) -> str:
    """The extension of the sample's image member; SampleError when it has none."""
    ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if ext is None:
        raise SampleError("no image", f"no {'/'.join('.' + e for e in IMAGE_EXTENSIONS)} member")
    return ext


def raw_label(sample: dict, rule: dict | None) -> int | str:
    """The label as stored: an integer, or a class name (JSON labels only)."""
    rule = rule or {"member": "cls"}
    member = rule["member"]
    if member not in sample:
        raise SampleError("no label", f"no .{member} member")
    if member == "cls":
        text = sample["cls"].decode("utf-8", "replace").strip()
        if not text.isdigit():
            raise SampleError("bad label", f".cls holds {text[:40]!r}, not a non-negative integer")
        return int(text)
    try:
        meta = json.loads(sample["json"])
    except ValueError as e:
        raise SampleError("bad label", f".json is not JSON: {e}") from None
    if not isinstance(meta, dict) or rule["key"] not in meta:
        raise SampleError("no label", f".json has no field {rule['key']!r}")
    value = meta[rule["key"]]
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise SampleError("bad label", f".json field {rule['key']!r} is {value!r}, not a class name or integer")


def label_index(value: int | str, classes: list[str], index: dict[str, int]) -> int:
    """A label as a class number, checked against the class list."""
    if isinstance(value, int):
        if value >= len(classes):
            raise SampleError("unknown class", f"label {value}, but there are {len(classes)} classes")
        return value
    if value not in index:
        raise SampleError("unknown class", f"{value!r} is not in the class list")
    return index[value]


def labeller(rule: dict | None, classes: list[str]) -> Callable[[dict], int]:
    """sample -> class number, raising SampleError for a sample without an image or a usable label."""
    index = {name: number for number, name in enumerate(classes)}

    def label(sample: dict) -> int:
        image_member(sample)
        return label_index(raw_label(sample, rule), classes, index)

    return label


def read_members(rule: dict | None) -> Callable[[str], bool]:
    """Which members to read (by extension) for labels by `rule`: the image and the label."""
    read = {*IMAGE_EXTENSIONS, (rule or {"member": "cls"})["member"]}
    return lambda ext: ext in read


def encode_offsets(offsets: list[int]) -> bytes:
    return np.asarray(offsets, dtype="<u8").tobytes()


def read_offsets(fs, path: str, first: int, count: int) -> np.ndarray:
    """offsets[first : first + count] of an offsets file, by one ranged read."""
    data = fs.cat_file(path, start=8 * first, end=8 * (first + count))
    if len(data) != 8 * count:
        raise ValueError(f"{path}: holds fewer offsets than the manifest's sample count needs")
    return np.frombuffer(data, dtype="<u8").astype(np.int64)
