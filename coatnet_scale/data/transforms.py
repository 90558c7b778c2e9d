"""Augmentation from torchvision's transforms.v2, built from a small spec.

Train: RandomResizedCrop, horizontal flip, RandAugment(n, m) per image; then Mixup or CutMix
(one of them at random per batch) and label smoothing on the batch, giving soft targets of
shape (B, num_classes). Softmax and sigmoid losses take the same soft targets: with sigmoid,
each class is an independent on/off target smoothed toward smoothing / num_classes.
Eval: resize the shorter side to image_size / crop_ratio, centre crop, integer labels as
targets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TransformSpec:
    image_size: int
    train: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    randaugment_ops: int = 2  # 0 disables RandAugment
    randaugment_magnitude: int = 9
    mixup_alpha: float = 0.8  # 0 disables
    cutmix_alpha: float = 1.0  # 0 disables
    label_smoothing: float = 0.1
    crop_ratio: float = 0.875  # eval only


def make_sample_transform(spec: TransformSpec):
    """RGB PIL image -> normalised float tensor (3, image_size, image_size). Geometry runs on
    the PIL image, so a crop is resized without first converting the whole image."""
    if spec.train:
        steps = [v2.RandomResizedCrop(spec.image_size, scale=spec.crop_scale, antialias=True)]
        if spec.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if spec.randaugment_ops:
            steps.append(v2.RandAugment(num_ops=spec.randaugment_ops, magnitude=spec.randaugment_magnitude))
    else:
        steps = [v2.Resize(round(spec.image_size / spec.crop_ratio), antialias=True), v2.CenterCrop(spec.image_size)]
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def make_batch_transform(spec: TransformSpec, num_classes: int):
    """(images, int labels) -> (images, targets): soft targets for training, labels for eval."""
    if not spec.train:
        return lambda images, labels: (images, labels)
    mixers = []
    if spec.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=spec.mixup_alpha, num_classes=num_classes))
    if spec.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=spec.cutmix_alpha, num_classes=num_classes))
    mix = v2.RandomChoice(mixers) if mixers else None
    smoothing = spec.label_smoothing

    def apply(images: torch.Tensor, labels: torch.Tensor):
        if mix is not None and len(labels) > 1:
            images, targets = mix(images, labels)
        else:
            targets = torch.nn.functional.one_hot(labels, num_classes).float()
        # Smoothing commutes with mixing (both are linear), so it can come last.
        return images, targets * (1 - smoothing) + smoothing / num_classes

    return apply
