"""The streaming loader: webdataset shards on any fsspec store -> decoded, augmented uint8 batches.

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
its shard and key, and counted in the batch's `corrupt` field. With `full_batches` (training)
its place is taken by another view of a good sample of the same batch (the first ones, in
order, decoded and augmented again), so the batch keeps its planned size and a compiled model
meets no new shape; its `keys` stay the good samples, each once. Without it (evaluation) the
batch is one smaller. When a worker's corrupt fraction passes `corrupt_limit` the run stops
with `CorruptDataError`. Only
image members (.jpg/.jpeg/.png/.webp) and the label member (.cls, or .json for JSON labels) are
read; nothing in a shard is ever unpickled. Samples a `dataprep index` manifest lists as
rejected (no image, no label) are passed over without counting.

Bytes. With offsets in the manifest (coatnet_scale/shard_format.py) a slot fetches exactly the byte
ranges of its samples, however far into a shard it starts; without, it streams each shard from
its first byte, as webdataset does.
"""
from __future__ import annotations

import io
import json
import logging
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from coatnet_scale.data.plan import (EpochSpec, Phase, SlotPlan, derive_seed, phase_plan, samples_left, shuffle_seed,
                                     shuffled)
from coatnet_scale.data.transforms import BatchTransform, TransformSpec, make_sample_transform, stack
from coatnet_scale.storage import RangeReader, url_to_fs
from coatnet_scale.shard_format import image_member, iter_samples, labeller, read_members, read_offsets

log = logging.getLogger(__name__)

READ_ATTEMPTS = 4
STREAM_BLOCK = 4 * 2**20


class CorruptDataError(RuntimeError):
    """Too many undecodable samples: the data, not the code, needs fixing."""


@dataclass(frozen=True)
class Manifest:
    url: str
    shard_urls: list[str]
    shard_sizes: list[int]
    classes: list[str]
    offsets_urls: list[str | None]  # per shard: its offsets file (coatnet_scale/shard_format.py), if any
    rejected_keys: list[frozenset[str]]  # per shard: samples in the tar that the manifest does not count
    labels: dict | None = None  # where labels come from; None: the .cls member

    @property
    def total_samples(self) -> int:
        return sum(self.shard_sizes)


def _resolve(base: str, name: str) -> str:
    return name if "://" in name or name.startswith("/") else f"{base}/{name}"


def load_manifest(url: str, storage_options: dict | None = None) -> Manifest:
    """A manifest written by `python -m dataprep` or `python -m dataprep index`."""
    fs, path = url_to_fs(url, storage_options)
    try:
        manifest = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: manifest not found (run dataprep first?)") from None
    base = url.rsplit("/", 1)[0]
    shards = manifest["shards"]
    return Manifest(
        url, [_resolve(base, s.get("url") or s["name"]) for s in shards], [s["samples"] for s in shards],
        manifest["classes"], [_resolve(base, s["offsets"]) if s.get("offsets") else None for s in shards],
        [frozenset(s.get("rejected_keys", ())) for s in shards], manifest.get("labels"),
    )


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
    full_batches: bool = False  # training: a corrupt sample's place is taken by another view of a good one


# ---------------------------------------------------------------------------------------
# Raw samples: plan -> shard bytes -> (key, members) in shuffled order


def _read_segment(manifest: Manifest, shard: int, skip: int, take: int, storage_options: dict | None,
                  wanted=lambda ext: True) -> Iterator[dict]:
    """`take` samples of one shard after the first `skip`, reopening on transient errors where
    it stopped. With an offsets file, exactly their bytes are fetched; without, the shard is
    streamed from its start and the first `skip` samples passed over."""
    url, offsets_url, rejected = manifest.shard_urls[shard], manifest.offsets_urls[shard], manifest.rejected_keys[shard]
    done, attempt, offsets = 0, 0, None
    while done < take:
        try:
            fs, path = url_to_fs(url, storage_options)
            if offsets_url is not None:
                if offsets is None:
                    offsets_fs, offsets_path = url_to_fs(offsets_url, storage_options)
                    offsets = read_offsets(offsets_fs, offsets_path, skip, take + 1)
                stream, mode, passed = RangeReader(fs, path, int(offsets[done]), int(offsets[take])), "r|", skip + done
            else:
                stream, mode, passed = fs.open(path, "rb", block_size=STREAM_BLOCK), "r|*", 0
            with stream:
                for sample in iter_samples(stream, wanted, mode=mode):
                    if sample["__key__"] in rejected:
                        continue
                    if passed < skip + done:
                        passed += 1
                        continue
                    sample["__url__"] = url
                    yield sample
                    done += 1
                    passed += 1
                    if done == take:
                        return
            raise EOFError(f"{url}: ended after {passed} samples, manifest says at least {skip + take}")
        except FileNotFoundError:  # not transient: a shard gone since the manifest was written
            raise
        except (OSError, TimeoutError) as e:  # connection resets, throttling, truncated reads
            attempt += 1
            if attempt >= READ_ATTEMPTS:
                raise OSError(f"{url}: giving up after {attempt} attempts: {e}") from e
            log.warning("%s: read failed (%s); retrying from sample %d", url, e, skip + done)
            time.sleep(0.5 * 2**attempt)


def _epoch_spec(spec: LoaderSpec, manifest: Manifest, epoch: int) -> EpochSpec:
    return EpochSpec(tuple(manifest.shard_sizes), spec.seed, epoch, spec.shuffle, spec.shuffle_buffer, spec.mode,
                     spec.epoch_samples)


def _slot_plan(spec: LoaderSpec, manifest: Manifest, epoch: int, rank: int, world_size: int, worker: int,
               phases: tuple[Phase, ...] = ()) -> SlotPlan:
    return phase_plan(_epoch_spec(spec, manifest, epoch), phases, rank, world_size, worker, max(1, spec.num_workers),
                      spec.batch_size)


def _raw_batches(spec: LoaderSpec, manifest: Manifest, epoch: int, rank: int, world_size: int, worker: int,
                 phases: tuple[Phase, ...] = ()):
    """(batch index, raw samples, is last batch) for one worker's slot, in order."""
    plan = _slot_plan(spec, manifest, epoch, rank, world_size, worker, phases)
    wanted = read_members(manifest.labels)
    samples = (
        sample
        for segment in plan.segments
        for sample in _read_segment(manifest, segment.shard, segment.skip, segment.take, spec.storage_options, wanted)
    )
    ordered = iter(samples)
    if spec.shuffle:
        seed = shuffle_seed(_epoch_spec(spec, manifest, epoch), rank, worker, len(phases))
        ordered = shuffled(samples, spec.shuffle_buffer, random.Random(seed))
    last = len(plan.batch_sizes) - 1
    for index, size in enumerate(plan.batch_sizes):
        yield index, [next(ordered) for _ in range(size)], index == last


def _batches_before(start_batch: int, worker: int, num_workers: int) -> int:
    """How many of a rank's first `start_batch` batches came from this worker (round robin)."""
    return len(range(worker, start_batch, num_workers))


# ---------------------------------------------------------------------------------------
# Decoded batches


def _decode(sample: dict, label_of) -> tuple[Image.Image, int]:
    label = label_of(sample)
    image = Image.open(io.BytesIO(sample[image_member(sample)]))
    image.load()  # decode now, so a damaged file fails here and is counted
    return (image if image.mode == "RGB" else image.convert("RGB")), label


class ShardStream(IterableDataset):
    """One epoch of one rank's batches. Each DataLoader worker plays one slot of the plan."""

    def __init__(self, spec: LoaderSpec, manifest: Manifest, rank: int, world_size: int, epoch: int, start_batch: int,
                 phases: tuple[Phase, ...] = ()):
        self.spec, self.manifest, self.phases = spec, manifest, phases
        self.rank, self.world_size, self.epoch, self.start_batch = rank, world_size, epoch, start_batch

    def __iter__(self):
        info = get_worker_info()
        workers = max(1, self.spec.num_workers)
        # Resuming mid-epoch, the DataLoader's round robin restarts at its worker 0, which must
        # therefore play the slot whose batch comes next.
        worker = ((info.id if info else 0) + self.start_batch) % workers
        skip = _batches_before(self.start_batch, worker, workers)
        sample_transform = make_sample_transform(self.spec.transform)
        label_of = labeller(self.manifest.labels, self.manifest.classes)
        limit = self.spec.corrupt_limit
        seen = corrupt = 0
        for index, raw, last in _raw_batches(self.spec, self.manifest, self.epoch, self.rank, self.world_size, worker,
                                             self.phases):
            if index < skip:
                continue
            # A later phase of a resized epoch draws its augmentation afresh.
            phase = (len(self.phases),) if self.phases else ()
            torch.manual_seed(derive_seed(self.spec.seed, self.epoch, self.rank, worker, index, *phase))
            images, labels, good = [], [], []
            for sample in raw:
                try:
                    image, label = _decode(sample, label_of)
                    images.append(sample_transform(image))
                except Exception as e:
                    log.warning("corrupt sample %s in %s: %s", sample.get("__key__"), sample.get("__url__"), e)
                    continue
                labels.append(label)
                good.append(sample)
            bad = len(raw) - len(good)
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
            if self.spec.full_batches:  # another view of a good sample of the batch for each corrupt one
                for sample in (good * -(-bad // len(good)))[:bad]:
                    image, label = _decode(sample, label_of)
                    images.append(sample_transform(image))
                    labels.append(label)
            # The batch's mixing happens on the training device (`StreamingLoader.to_device`),
            # with draws seeded here, with the rest of its augmentation.
            mix_seed = int(torch.randint(2**62, ()))
            yield {"images": stack(images), "labels": torch.tensor(labels), "mix_seed": mix_seed,
                   "keys": [sample["__key__"] for sample in good], "corrupt": bad}


class StreamingLoader:
    """A rank's view of a dataset: `for batch in loader.epoch(e, start_batch)`."""

    def __init__(self, spec: LoaderSpec, rank: int = 0, world_size: int = 1):
        if spec.mode not in ("exact", "resampled"):
            raise ValueError(f"mode must be 'exact' or 'resampled', got {spec.mode!r}")
        if spec.mode == "resampled" and not spec.epoch_samples:
            raise ValueError("resampled mode needs epoch_samples")
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.manifest = load_manifest(spec.manifest_url, spec.storage_options)
        self.batches_per_epoch = self.batches_in(0)
        self.batch_transform = BatchTransform(spec.transform, len(self.manifest.classes))

    def to_device(self, batch: dict, device: torch.device, dtype: torch.dtype = torch.float32):
        """A batch as the model takes it: (images normalised, in `dtype`; targets), on `device`.
        Training targets are soft (B, num_classes), after Mixup/CutMix and label smoothing;
        evaluation targets are the labels. The loader hands over uint8 images, a quarter of the
        bytes of float ones, and the arithmetic runs on the device."""
        images = batch["images"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        images, targets = self.batch_transform(images, labels, batch["mix_seed"])
        return images.to(dtype), targets

    def batches_in(self, epoch: int, phases: tuple[Phase, ...] = ()) -> int:
        """This rank's batches in `epoch` (in the phase after `phases`, for a resized epoch)."""
        return len(_slot_plan(self.spec, self.manifest, epoch, self.rank, self.world_size, 0, phases).batch_sizes) * \
            max(1, self.spec.num_workers)

    def continue_from(self, epoch: int, batch_in_epoch: int, phases: tuple[Phase, ...],
                      group: list[int] | None = None) -> tuple[int, int, tuple[Phase, ...]]:
        """Where this rank reads on from a place in the data order: each rank of `group` ([world
        size, DataLoader workers, batch size]; None: this rank's own) had read `batch_in_epoch`
        batches of `epoch` after `phases`. Another group's place closes its phase and this group
        reads the rest of the epoch, or the next epoch when too few samples are left to give each
        of its slots one (rank 0 says so); a place at an epoch's end goes on at the next epoch.
        Returns (epoch, batch_in_epoch, phases) for `epoch(...)`."""
        if group is not None and list(group) != [self.world_size, self.spec.num_workers, self.spec.batch_size]:
            phases, batch_in_epoch = (*phases, Phase(*group, batch_in_epoch)), 0
            left, slots = self.samples_left(epoch, phases), self.world_size * max(1, self.spec.num_workers)
            if left < slots:
                if self.rank == 0 and left:
                    print(f"data: the last {left} samples of epoch {epoch} are left out: fewer than this group's "
                          f"{slots} loader slots", flush=True)
                return epoch + 1, 0, ()
        if batch_in_epoch >= self.batches_in(epoch, phases):
            return epoch + 1, 0, ()
        return epoch, batch_in_epoch, phases

    def samples_left(self, epoch: int, phases: tuple[Phase, ...]) -> int:
        """Samples of `epoch` that the groups of `phases` left unread, all ranks together."""
        return samples_left(_epoch_spec(self.spec, self.manifest, epoch), phases)

    def epoch(self, epoch: int, start_batch: int = 0, phases: tuple[Phase, ...] = ()) -> DataLoader:
        """Batches start_batch, start_batch + 1, ... of `epoch`; after `phases` (groups of other
        sizes that read part of this epoch), the rest of the epoch cut for this group."""
        if phases:
            self.batches_in(epoch, phases)  # plans the rest once, here, before the workers fork
        stream = ShardStream(self.spec, self.manifest, self.rank, self.world_size, epoch, start_batch, phases)
        workers = self.spec.num_workers
        # A generator of its own: the DataLoader draws its workers' base seed from it, which
        # would otherwise advance the trainer's global RNG and break bit-exact resume. Our
        # workers seed every batch themselves, so the base seed is unused.
        return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                          prefetch_factor=4 if workers else None, multiprocessing_context="fork" if workers else None,
                          generator=torch.Generator(), pin_memory=torch.cuda.is_available(),  # async copies to a GPU
                          worker_init_fn=_leave_stop_signals_to_the_trainer if workers else None)


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """In a loader worker: SIGTERM and SIGUSR1 reach the whole process group (torchrun's
    shutdown, Slurm) and would kill it mid-epoch, which fails the step the trainer is finishing
    to save on them (coatnet_scale/engine/interrupt.py). The trainer ends its workers itself; an
    orphaned worker exits when it sees its parent gone."""
    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)


def epoch_keys(spec: LoaderSpec, rank: int, world_size: int, epoch: int, phases: tuple[Phase, ...] = (),
               batches: int | None = None, start: int = 0) -> list[str]:
    """The sample keys `rank` trains on in `epoch`, in order (before corrupt samples drop out),
    computed the way the loader computes them, without decoding anything: in the phase after
    `phases`, and only its batches `start` to `batches` (exclusive) if given."""
    manifest = load_manifest(spec.manifest_url, spec.storage_options)
    workers = max(1, spec.num_workers)
    per_worker = [[[s["__key__"] for s in raw] for _, raw, _ in _raw_batches(spec, manifest, epoch, rank, world_size, w, phases)]
                  for w in range(workers)]
    in_order = [per_worker[w][batch] for batch in range(len(per_worker[0])) for w in range(workers)]
    return [key for batch in in_order[start:batches] for key in batch]
