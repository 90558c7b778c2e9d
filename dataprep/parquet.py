"""Parquet in: image corpora laid out as the Hugging Face Hub lays them out, sharded like any other.

SOURCE is a .parquet file, a glob of them (`data/train-*.parquet`) or a folder holding them,
local or at any fsspec URL. Each row is one input: the image column (default `image`) is a
struct {bytes, path}, as the Hub's `Image` feature stores it (plain binary is taken too), the
label column (`--label-column`, default `label`) an integer or a string. Class names come, in
this order, from --classes, from the schema's Hugging Face features metadata (the `huggingface`
key: a `ClassLabel`'s names, so label i is names[i]), else from the distinct values of the label
column across the files (one read of that column alone).

The plan: each file's rows, in order, cut into runs of N rows (N from --samples-per-shard or
--shard-bytes over the mean row size the footers give); one run per shard, a task for a worker
process or a Ray CPU. A worker reads only the row groups its run overlaps, streamed
(ParquetFile.iter_batches), so its memory is about one row group's, whatever the file's size
(benchmarks/parquet_memory.py). Rows are not shuffled across files: the loader shuffles shards
and a buffer of samples, and the Hub's files are written in a shuffled order.

Images are stored as they are (JPEG, PNG, WebP: no decode and re-encode) unless a resize is
asked for (--max-side; its default is 0, keep, for parquet). A row without image bytes, with
bytes that do not decode, or without a usable label is rejected, named `FILE#row=N` (N counts
from 0 in that file), and counted in the manifest, as every input is. Shards, manifest,
progress records and resuming are dataprep's own (prep.py).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import asdict, dataclass

from coatnet_scale.storage import url_to_fs
from dataprep import prep
from dataprep.images import Rejected, keep_image
from dataprep.shards import ShardWriter, remove_stale_temporaries, shard_name, staging_directory
from dataprep.sources import SourceError

GLOB_CHARS = "*?["


def parquet_files(source: str, storage_options: dict) -> list[str] | None:
    """The parquet files SOURCE names, as URLs in name order; None when SOURCE is no parquet."""
    fs, path = url_to_fs(source, storage_options)
    if not source.rstrip("/").endswith(".parquet"):  # a folder of parquet files, or another layout
        if not fs.isdir(path):
            return None
        found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
        return [fs.unstrip_protocol(p) for p in found] or None
    found = sorted(fs.glob(path)) if any(c in path for c in GLOB_CHARS) else ([path] if fs.exists(path) else [])
    if not found:
        raise SourceError(f"{source}: no parquet file found")
    return [fs.unstrip_protocol(p) for p in found]


def _open(url: str, storage_options: dict):
    """Without pre-buffering: pyarrow 26 then reads all the row groups asked for at once (the
    whole file, in iter_batches), where a small read buffer keeps one at a time in memory."""
    import pyarrow.parquet as pq

    fs, path = url_to_fs(url, storage_options)
    return pq.ParquetFile(fs.open(path, "rb"), pre_buffer=False, buffer_size=2**20)


def hf_class_names(schema, label_column: str) -> list[str] | None:
    """A ClassLabel's names from the Hugging Face features metadata of an Arrow schema."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    features = json.loads(raw).get("info", {}).get("features", {})
    label = features.get(label_column, {})
    return [str(n) for n in label["names"]] if label.get("_type") == "ClassLabel" and "names" in label else None


@dataclass(frozen=True)
class ParquetFileInfo:
    url: str
    rows: int
    bytes: int  # uncompressed bytes of the columns read, from the footer
    names: tuple[str, ...] | None  # Hugging Face ClassLabel names


def describe(url: str, image_column: str, label_column: str, storage_options: dict) -> ParquetFileInfo:
    """One file's footer: rows, sizes, class names; a SourceError naming the file when a column is missing."""
    try:
        f = _open(url, storage_options)
    except Exception as e:
        raise SourceError(f"{url}: not a readable parquet file ({type(e).__name__}: {e})") from None
    schema = f.schema_arrow
    missing = [c for c in (image_column, label_column) if c not in schema.names]
    if missing:
        raise SourceError(f"{url}: no column {', '.join(missing)}; it has {', '.join(schema.names)} "
                          f"(--image-column, --label-column)")
    meta = f.metadata
    wanted = {image_column, label_column}
    size = sum(rg.column(c).total_uncompressed_size for i in range(meta.num_row_groups)
               for rg in [meta.row_group(i)] for c in range(rg.num_columns)
               if rg.column(c).path_in_schema.split(".")[0] in wanted)
    names = hf_class_names(schema, label_column)
    return ParquetFileInfo(url, meta.num_rows, size, tuple(names) if names is not None else None)


def distinct_labels(url: str, label_column: str, storage_options: dict) -> set[str]:
    f = _open(url, storage_options)
    values = set()
    for batch in f.iter_batches(batch_size=65536, columns=[label_column]):
        values.update(str(v) for v in batch.column(0).to_pylist() if v is not None)
    return values


@dataclass(frozen=True)
class ParquetTask:
    index: int
    name: str
    dest: str
    url: str
    start: int  # rows [start, end) of the file
    end: int
    image_column: str
    label_column: str
    names: tuple[str, ...] | None  # label i is names[i] (Hugging Face ClassLabel)
    classes: tuple[str, ...]  # the dataset's class order


def _label(value, task: ParquetTask, label_of: dict) -> tuple[int, str]:
    if value is None or (task.names is not None and value == -1):  # -1: the Hub's "no label" (test splits)
        raise Rejected("no label", f"{task.label_column} is {value}")
    if task.names is not None:
        if not isinstance(value, int) or not 0 <= value < len(task.names):
            raise Rejected("unknown class",
                           f"{task.label_column} {value!r} is not a class index below {len(task.names)}")
        value = task.names[value]
    name = str(value)
    if name not in label_of:
        raise Rejected("unknown class", f"{name!r} is not in the class list")
    return label_of[name], name


def _image_bytes(value) -> tuple[bytes, str | None]:
    """(bytes, original path) of an image cell: the Hub's struct {bytes, path}, or plain binary."""
    if isinstance(value, dict):
        if not value.get("bytes"):
            where = f" (path {value['path']!r}, not embedded)" if value.get("path") else ""
            raise Rejected("missing image", f"no image bytes{where}")
        return value["bytes"], value.get("path")
    if not value:
        raise Rejected("missing image", "no image bytes")
    return value, None


def _rows(task: ParquetTask, storage_options: dict):
    """(row number, image cell, label) of the task's rows, reading only the row groups they lie in."""
    f = _open(task.url, storage_options)
    groups, first, row = [], None, 0
    for i in range(f.metadata.num_row_groups):
        n = f.metadata.row_group(i).num_rows
        if row < task.end and row + n > task.start:
            groups.append(i)
            first = row if first is None else first
        row += n
    row = first or 0
    try:
        for batch in f.iter_batches(batch_size=64, row_groups=groups, columns=[task.image_column, task.label_column]):
            for image, label in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                if task.start <= row < task.end:
                    yield row, image, label
                row += 1
    finally:
        f.close()


def write_parquet_shard(task: ParquetTask) -> dict:
    """Store one run of rows as a shard, publish it, return its progress record (as prep.write_shard)."""
    storage_options = prep._worker["storage_options"]
    fs, root = prep.open_dest(task.dest, storage_options)
    writer = ShardWriter(staging_directory(fs, root))
    label_of = {name: i for i, name in enumerate(task.classes)}
    stem = posixpath.basename(task.url).removesuffix(".parquet").replace(".", "_")  # a webdataset key has no dot
    rejected = []
    try:
        for row, cell, value in _rows(task, storage_options):
            where = f"{task.url}#row={row}"
            try:
                label, name = _label(value, task, label_of)
                data, original = _image_bytes(cell)
                image, ext, width, height = keep_image(data, prep._worker["image_options"])
            except Rejected as r:
                rejected.append({"path": where, "reason": r.reason, "detail": r.detail})
                continue
            meta = {"source": where, "class": name, "width": width, "height": height}
            if original:
                meta["path"] = original
            writer.add(f"{stem}-{row:09d}", image, label, meta, ext)
        shard = prep.publish_shard(writer, fs, root, task.name)
    except BaseException:
        writer.discard()
        raise
    return {"index": task.index, "shard": shard, "rejected": rejected, "inputs": task.end - task.start}


def class_list(files: list[ParquetFileInfo], options, label_column: str, storage_options: dict,
               pool) -> tuple[list[str], tuple | None]:
    """(the dataset's classes, the ClassLabel names labels index into, if any)."""
    named = {f.names for f in files}
    if len(named) > 1:
        odd = next(f.url for f in files if f.names != files[0].names)
        raise SourceError(f"{odd}: its Hugging Face class names differ from {files[0].url}'s")
    names = files[0].names if files else None
    if options.classes:
        return prep.read_classes(options.classes, storage_options), names
    if names is not None:
        return list(names), names
    found = set().union(*pool.imap(_distinct, [(f.url, label_column) for f in files])) if files else set()
    return prep.sort_class_names(found), None


def _distinct(task: tuple[str, str]) -> set[str]:
    return distinct_labels(task[0], task[1], prep._worker["storage_options"])


def _describe(task: tuple[str, str, str]) -> ParquetFileInfo:
    return describe(*task, prep._worker["storage_options"])


def plan(files: list[ParquetFileInfo], options) -> list[tuple[str, int, int]]:
    """(url, start, end) of each shard: each file's rows in runs of N."""
    rows = sum(f.rows for f in files)
    per_shard = []
    if options.samples_per_shard:
        per_shard.append(options.samples_per_shard)
    if options.shard_bytes:
        mean = sum(f.bytes for f in files) / max(1, rows)
        per_shard.append(max(1, int(options.shard_bytes // max(1.0, mean + 2048))))
    n = min(per_shard)
    return [(f.url, start, min(f.rows, start + n)) for f in files for start in range(0, f.rows, n)]


def prepare_parquet(source: str, urls: list[str], dest: str, options, workers: int, ray_address: str | None,
                    storage_options: dict, image_column: str = "image", label_column: str = "label", log=print,
                    observe=None) -> dict:
    """Shard the parquet files `urls` (SOURCE expanded) into DEST; return the manifest. Safe to rerun."""
    fs, root = prep.open_dest(dest, storage_options)
    fs.makedirs(root, exist_ok=True)
    pool = prep._make_pool(workers, ray_address, (options.image, storage_options))
    progress = None
    try:
        files = list(pool.imap(_describe, [(url, image_column, label_column) for url in urls]))
        classes, names = class_list(files, options, label_column, storage_options, pool)
        total = sum(f.rows for f in files)
        digest = hashlib.sha256(json.dumps([source, asdict(options), classes, image_column, label_column,
                                            [asdict(f) for f in files]], sort_keys=True).encode())
        fingerprint = digest.hexdigest()
        log(f"dataprep: {total} rows in {len(files)} parquet file(s), {len(classes)} classes"
            f"{' (Hugging Face ClassLabel names)' if names and not options.classes else ''} from {source}")
        if fs.exists(f"{root}/manifest.json"):
            manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
            if manifest.get("fingerprint") != fingerprint:
                raise prep.PrepError(f"{dest}: already holds a finished dataset made from other inputs or options")
            log(f"dataprep: {dest} is already complete ({manifest['total_samples']} samples); nothing to do")
            return manifest
        runs = plan(files, options)
        remove_stale_temporaries(fs, root)
        records = prep._finished_records(fs, root, fingerprint, len(runs), log)
        if records:
            log(f"dataprep: resuming: {len(records)} of {len(runs)} shards already written")
        todo = [k for k in range(len(runs)) if k not in records]
        tasks = (ParquetTask(k, shard_name(options.split, k), dest, *runs[k], image_column, label_column, names,
                             tuple(classes)) for k in todo)
        if observe is not None:
            observe({"shard": None, "rejected": []})
        progress = prep.Progress(total, total - sum(runs[k][2] - runs[k][1] for k in todo), len(todo))
        prep.collect(pool.imap_unordered(write_parquet_shard, tasks), fs, root, fingerprint, records, progress,
                     observe)
    finally:
        pool.terminate()
        if progress is not None:
            progress.close()
    return prep.finish(fs, root, dest, source, options, classes, [records[k] for k in range(len(runs))], [], total,
                       fingerprint, progress, log)
