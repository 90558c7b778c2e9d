"""The streaming input pipeline: manifest -> shards (any fsspec store) -> augmented batches.

`train_loader(config, rank, world_size)` and `eval_loader(...)` build a `StreamingLoader`
from a validated config; see loader.py for the order, resume and bad-data guarantees and
plan.py for how samples are split across ranks and workers.
"""
from coatnet_scale.data.loader import CorruptDataError, LoaderSpec, StreamingLoader, epoch_keys, load_manifest
from coatnet_scale.data.transforms import TransformSpec
from coatnet_scale.storage import storage_options


def _spec(config, train: bool) -> LoaderSpec:
    data = config.data
    transform = TransformSpec(
        image_size=config.model.image_size, train=train, crop_scale=tuple(data.crop_scale), hflip=data.hflip,
        randaugment_ops=data.randaugment_ops, randaugment_magnitude=data.randaugment_magnitude,
        mixup_alpha=data.mixup_alpha, cutmix_alpha=data.cutmix_alpha,
        label_smoothing=config.train.label_smoothing, crop_ratio=data.eval_crop_ratio,
    )
    return LoaderSpec(
        manifest_url=data.train_manifest if train else data.val_manifest,
        batch_size=config.train.micro_batch_size, transform=transform, num_workers=data.num_workers,
        seed=config.train.seed, shuffle=train, mode=data.mode if train else "exact", epoch_samples=data.epoch_samples,
        shuffle_buffer=data.shuffle_buffer, corrupt_limit=data.corrupt_limit,
        storage_options=storage_options(config.storage), full_batches=train,
    )


def train_loader(config, rank: int, world_size: int) -> StreamingLoader:
    return StreamingLoader(_spec(config, train=True), rank, world_size)


def eval_loader(config, rank: int, world_size: int) -> StreamingLoader:
    return StreamingLoader(_spec(config, train=False), rank, world_size)


__all__ = [
    "CorruptDataError", "LoaderSpec", "StreamingLoader", "TransformSpec", "epoch_keys", "eval_loader",
    "load_manifest", "train_loader",
]
