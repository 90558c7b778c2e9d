"""The streaming loader: webdataset shards on any fsspec store -> decoded, augmented batches.

Order. What each (rank, worker) reads is fixed by `plan.py`; each worker passes its samples
through a shuffle buffer seeded by (seed, epoch, rank, worker), cuts them into its planned
batches, and augments each batch under a torch seed derived from (seed, epoch, rank, worker,
batch). So an epoch's batches depend only on (seed, epoch, rank, world size, workers), never on
timing.

Resume guarantee. `epoch(e, start_batch=c)` yields exactly the batches c, c+1, ... that an
uninterrupted `epoch(e)` would have yielded on this rank: the same samples, in the same order,
with the same augmentation, bit for bit. The skipped batches' samples are read but not decoded.
The training checkpoint stores (epoch, batches consumed); samples consumed follow from it.

Bad data. A sample that fails to decode, or lacks its image or label, is skipped, logged with
its shard and key, and counted in the batch's `corrupt` field; its batch is one smaller. When a
worker's corrupt fraction passes `corrupt_limit` the run stops with `CorruptDataError`. Only
.jpg/.jpeg/.png/.webp, .cls and .json members are read, and webdataset's security switch is on:
nothing in a shard is ever unpickled.
"""
from __future__ import annotations

import io
import json
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import webdataset
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from coatnet_scale.data.plan import SlotPlan, derive_seed, exact_plan, resampled_plan
from coatnet_scale.data.transforms import TransformSpec, make_batch_transform, make_sample_transform
from coatnet_scale.storage import url_to_fs

webdataset.utils.enforce_security = True

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
READ_EXTENSIONS = {*IMAGE_EXTENSIONS, "cls", "json"}
READ_ATTEMPTS = 4


class CorruptDataError(RuntimeError):
    """Too many undecodable samples: the data, not the code, needs fixing."""


@dataclass(frozen=True)
class Manifest:
    url: str
    shard_urls: list[str]
    shard_sizes: list[int]
    classes: list[str]

    @property
    def total_samples(self) -> int:
        return sum(self.shard_sizes)


def load_manifest(url: str, storage_options: dict | None = None) -> Manifest:
    fs, path = url_to_fs(url, storage_options)
    try:
        manifest = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: manifest not found (run dataprep first?)") from None
    base = url.rsplit("/", 1)[0]
    shards = manifest["shards"]
    return Manifest(url, [f"{base}/{s['name']}" for s in shards], [s["samples"] for s in shards], manifest["classes"])


@dataclass(frozen=True)
class LoaderSpec:
    manifest_url: str
    batch_size: int
    transform: TransformSpec
    num_workers: int = 2
    seed: int = 0
    shuffle: bool = True  # shard order and shuffle buffer; off for evaluation
    mode: str = "exact"  # or "resampled"
    epoch_samples: int | None = None  # resampled mode: samples per epoch, all ranks together
    shuffle_buffer: int = 1000
    corrupt_limit: float = 0.001
    storage_options: dict | None = None


# ---------------------------------------------------------------------------------------
# Raw samples: plan -> shard bytes -> (key, members) in shuffled order


def _read_segment(manifest: Manifest, shard: int, skip: int, take: int, storage_options: dict | None) -> Iterator[dict]:
    """`take` samples of one shard after the first `skip`, reopening on transient errors."""
    url = manifest.shard_urls[shard]
    done, attempt = 0, 0
    while done < take:
        try:
            fs, path = url_to_fs(url, storage_options)
            with fs.open(path, "rb", block_size=4 * 2**20) as stream:
                files = tar_file_expander([{"url": url, "stream": stream}], select_files=_wanted)
                for index, sample in enumerate(group_by_keys(files)):
                    if index < skip + done:
                        continue
                    yield sample
                    done += 1
                    if done == take:
                        return
            raise EOFError(f"{url}: ended after {skip + done} samples, manifest says at least {skip + take}")
        except (OSError, TimeoutError) as e:  # connection resets, throttling, truncated reads
            attempt += 1
            if attempt >= READ_ATTEMPTS:
                raise OSError(f"{url}: giving up after {attempt} attempts: {e}") from e
            log.warning("%s: read failed (%s); retrying from sample %d", url, e, skip + done)
            time.sleep(0.5 * 2**attempt)


def _wanted(name: str) -> bool:
    return name.rpartition(".")[2].lower() in READ_EXTENSIONS


def _shuffled(samples: Iterator[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def _slot_plan(spec: LoaderSpec, manifest: Manifest, epoch: int, rank: int, world_size: int, worker: int) -> SlotPlan:
    workers = max(1, spec.num_workers)
    args = (manifest.shard_sizes, spec.seed, epoch, rank, world_size, worker, workers, spec.batch_size)
    if spec.mode == "exact":
        return exact_plan(*args, shuffle=spec.shuffle)
    return resampled_plan(*args, spec.epoch_samples)


def _raw_batches(spec: LoaderSpec, manifest: Manifest, epoch: int, rank: int, world_size: int, worker: int):
    """(batch index, raw samples, is last batch) for one worker's slot, in order."""
    plan = _slot_plan(spec, manifest, epoch, rank, world_size, worker)
    samples = (
        sample
        for segment in plan.segments
        for sample in _read_segment(manifest, segment.shard, segment.skip, segment.take, spec.storage_options)
    )
    ordered = iter(samples)
    if spec.shuffle:
        ordered = _shuffled(samples, spec.shuffle_buffer, random.Random(derive_seed(spec.seed, epoch, rank, worker, 2)))
    last = len(plan.batch_sizes) - 1
    for index, size in enumerate(plan.batch_sizes):
        yield index, [next(ordered) for _ in range(size)], index == last


def _batches_before(start_batch: int, worker: int, num_workers: int) -> int:
    """How many of a rank's first `start_batch` batches came from this worker (round robin)."""
    return len(range(worker, start_batch, num_workers))


# ---------------------------------------------------------------------------------------
# Decoded batches


def _decode(sample: dict) -> tuple[Image.Image, int]:
    image_key = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_key is None or "cls" not in sample:
        raise ValueError(f"missing {'image' if image_key is None else '.cls'} member")
    image = Image.open(io.BytesIO(sample[image_key]))
    image.load()  # decode now, so a damaged file fails here and is counted
    return image.convert("RGB"), int(sample["cls"])


class ShardStream(IterableDataset):
    """One epoch of one rank's batches. Each DataLoader worker plays one slot of the plan."""

    def __init__(self, spec: LoaderSpec, manifest: Manifest, rank: int, world_size: int, epoch: int, start_batch: int):
        self.spec, self.manifest = spec, manifest
        self.rank, self.world_size, self.epoch, self.start_batch = rank, world_size, epoch, start_batch

    def __iter__(self):
        info = get_worker_info()
        workers = max(1, self.spec.num_workers)
        # Resuming mid-epoch, the DataLoader's round robin restarts at its worker 0, which must
        # therefore play the slot whose batch comes next.
        worker = ((info.id if info else 0) + self.start_batch) % workers
        skip = _batches_before(self.start_batch, worker, workers)
        sample_transform = make_sample_transform(self.spec.transform)
        batch_transform = make_batch_transform(self.spec.transform, len(self.manifest.classes))
        limit = self.spec.corrupt_limit
        seen = corrupt = 0
        for index, raw, last in _raw_batches(self.spec, self.manifest, self.epoch, self.rank, self.world_size, worker):
            if index < skip:
                continue
            torch.manual_seed(derive_seed(self.spec.seed, self.epoch, self.rank, worker, index))
            images, labels, keys, bad = [], [], [], 0
            for sample in raw:
                try:
                    image, label = _decode(sample)
                    images.append(sample_transform(image))
                except Exception as e:
                    bad += 1
                    log.warning("corrupt sample %s in %s: %s", sample.get("__key__"), sample.get("__url__"), e)
                    continue
                labels.append(label)
                keys.append(sample["__key__"])
            seen, corrupt = seen + len(raw), corrupt + bad
            # Judge the fraction once it means something: after 1/limit samples, or at the end.
            if corrupt > limit * seen and (last or limit == 0 or seen * limit >= 1):
                raise CorruptDataError(
                    f"{corrupt} of {seen} samples could not be decoded (rank {self.rank}, worker {worker}, "
                    f"epoch {self.epoch}), more than data.corrupt_limit={limit}; the 'corrupt sample' "
                    f"warnings name their shards and keys"
                )
            if not images:
                raise CorruptDataError(f"every sample of batch {index} (rank {self.rank}, worker {worker}) is corrupt")
            batch_images, targets = batch_transform(torch.stack(images), torch.tensor(labels))
            yield {"images": batch_images, "targets": targets, "labels": torch.tensor(labels), "keys": keys, "corrupt": bad}


class StreamingLoader:
    """A rank's view of a dataset: `for batch in loader.epoch(e, start_batch)`."""

    def __init__(self, spec: LoaderSpec, rank: int = 0, world_size: int = 1):
        if spec.mode not in ("exact", "resampled"):
            raise ValueError(f"mode must be 'exact' or 'resampled', got {spec.mode!r}")
        if spec.mode == "resampled" and not spec.epoch_samples:
            raise ValueError("resampled mode needs epoch_samples")
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.manifest = load_manifest(spec.manifest_url, spec.storage_options)
        self.batches_per_epoch = len(_slot_plan(spec, self.manifest, 0, rank, world_size, 0).batch_sizes) * max(1, spec.num_workers)

    def epoch(self, epoch: int, start_batch: int = 0) -> DataLoader:
        stream = ShardStream(self.spec, self.manifest, self.rank, self.world_size, epoch, start_batch)
        workers = self.spec.num_workers
        # A generator of its own: the DataLoader draws its workers' base seed from it, which
        # would otherwise advance the trainer's global RNG and break bit-exact resume. Our
        # workers seed every batch themselves, so the base seed is unused.
        return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                          prefetch_factor=4 if workers else None, multiprocessing_context="fork" if workers else None,
                          generator=torch.Generator())


def epoch_keys(spec: LoaderSpec, rank: int, world_size: int, epoch: int) -> list[str]:
    """The sample keys `rank` trains on in `epoch`, in order (before corrupt samples drop out),
    computed the way the loader computes them, without decoding anything."""
    manifest = load_manifest(spec.manifest_url, spec.storage_options)
    workers = max(1, spec.num_workers)
    per_worker = [[[s["__key__"] for s in raw] for _, raw, _ in _raw_batches(spec, manifest, epoch, rank, world_size, w)]
                  for w in range(workers)]
    keys = []
    for batch in range(len(per_worker[0])):
        for w in range(workers):
            keys += per_worker[w][batch]
    return keys
