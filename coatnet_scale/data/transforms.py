"""Augmentation from torchvision's transforms.v2, built from a small spec.

Train: RandomResizedCrop, horizontal flip, RandAugment(n, m) per image; then, per batch,
normalisation, Mixup or CutMix
(one of them at random per batch) and label smoothing on the batch, giving soft targets of
shape (B, num_classes). Softmax and sigmoid losses take the same soft targets: with sigmoid,
each class is an independent on/off target smoothed toward smoothing / num_classes.
Eval: resize the shorter side to image_size / crop_ratio, centre crop, integer labels as
targets.

`reference_sample_transform` is that augmentation as torchvision composes it; the loader runs
`make_sample_transform`, the same random draws computed faster (docs/data.md, "Loader speed").
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

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


def reference_sample_transform(spec: TransformSpec):
    """RGB PIL image -> uint8 tensor (3, image_size, image_size), composed of torchvision's
    transforms.v2 as usual: the definition of what the model sees. `make_sample_transform`
    computes the same thing faster; the tests and benchmarks/loader_throughput.py measure it
    against this."""
    if spec.train:
        steps = [v2.RandomResizedCrop(spec.image_size, scale=spec.crop_scale, antialias=True)]
        if spec.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if spec.randaugment_ops:
            steps.append(v2.RandAugment(num_ops=spec.randaugment_ops, magnitude=spec.randaugment_magnitude))
    else:
        steps = [v2.Resize(round(spec.image_size / spec.crop_ratio), antialias=True), v2.CenterCrop(spec.image_size)]
    return v2.Compose([*steps, v2.ToImage()])


def make_sample_transform(spec: TransformSpec):
    """RGB PIL image -> uint8 tensor (3, image_size, image_size): `reference_sample_transform`,
    drawing the same random numbers in the same order (so the same crop, flip and RandAugment
    operations), computed faster. Differences from it are resampling noise only: the crop is
    resized by torch's uint8 antialiased bilinear kernel (vectorised; PIL's is not), which
    differs from PIL's by at most one level in a few pixels. Conversion to float and
    normalisation wait for the batch (`normalize`)."""
    return _TrainTransform(spec) if spec.train else reference_sample_transform(spec)


class _TrainTransform:
    def __init__(self, spec: TransformSpec):
        self.size = spec.image_size
        self.crop = v2.RandomResizedCrop(spec.image_size, scale=spec.crop_scale, antialias=True)
        self.hflip = spec.hflip
        self.randaugment = (_RandAugment(spec.randaugment_ops, spec.randaugment_magnitude, spec.image_size)
                            if spec.randaugment_ops else None)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        box = self.crop.make_params([image])
        top, left = box["top"], box["left"]
        crop = image.crop((left, top, left + box["width"], top + box["height"]))
        pixels = F.resize_image(_pixels(crop), [self.size, self.size], antialias=True)
        image = Image.frombytes("RGB", (self.size, self.size), pixels.permute(1, 2, 0).numpy(), "raw", "RGBX")
        if self.hflip and torch.rand(1) < 0.5:  # as v2.RandomHorizontalFlip draws it
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            image = self.randaugment(image)
        return _pixels(image)[:3]


def _pixels(image: Image.Image) -> torch.Tensor:
    """A read-only (4, H, W) channels-last view of an RGB image's bytes as PIL holds them
    (RGBX: 4 per pixel). Torch's vectorised uint8 resize takes and returns that layout, and
    PIL copies it without repacking, so no conversion is needed on either side."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "buffer is not writable": nothing writes
        data = torch.frombuffer(image.tobytes("raw", "RGBX"), dtype=torch.uint8)
    return data.view(image.height, image.width, 4).permute(2, 0, 1)


class _RandAugment(v2.RandAugment):
    """v2.RandAugment for PIL images of one size: the same draws of operations and signs from
    torch's generator, the same operations, the same result bit for bit, with less overhead:
    magnitudes are looked up once for the size, and Sharpness smooths with numpy instead of
    PIL's 3x3 filter (1 ms at 224 px, four times the next slowest operation)."""

    def __init__(self, num_ops: int, magnitude: int, size: int):
        super().__init__(num_ops=num_ops, magnitude=magnitude)
        self.size = size
        self.ops = []
        for name, (magnitudes, signed) in self._AUGMENTATION_SPACE.items():
            values = magnitudes(self.num_magnitude_bins, size, size)
            self.ops.append((name, None if values is None else float(values[self.magnitude]), signed))

    def forward(self, image):
        if not isinstance(image, Image.Image) or image.size != (self.size, self.size):
            return super().forward(image)
        for _ in range(self.num_ops):
            name, magnitude, signed = self.ops[int(torch.randint(len(self.ops), ()))]
            if magnitude is None:
                magnitude = 0.0
            elif signed and torch.rand(()) <= 0.5:
                magnitude = -magnitude
            image = self._apply_image_or_video_transform(image, name, magnitude, self.interpolation, self._fill)
        return image

    def _apply_image_or_video_transform(self, image, transform_id, magnitude, interpolation, fill):
        if transform_id == "Sharpness" and isinstance(image, Image.Image) and image.mode == "RGB":
            return Image.blend(_smooth(image), image, 1.0 + magnitude)  # as PIL's ImageEnhance.Sharpness
        return super()._apply_image_or_video_transform(image, transform_id, magnitude, interpolation, fill)


def _smooth(image: Image.Image) -> Image.Image:
    """image.filter(ImageFilter.SMOOTH) for an RGB image: kernel 1 1 1 / 1 5 1 / 1 1 1 over 13,
    rounded; the outermost pixels stay as they are."""
    pixels = np.array(image)
    if image.width < 3 or image.height < 3:
        return image.copy()
    rows = pixels.reshape(image.height, -1)  # a pixel's horizontal neighbours are 3 bytes away
    x = rows.astype(np.int16)
    across = x[:, :-6] + x[:, 3:-3] + x[:, 6:]
    total = across[:-2] + across[1:-1] + across[2:] + 4 * x[1:-1, 3:-3]
    rows[1:-1, 3:-3] = (2 * total + 13) // 26
    return Image.fromarray(pixels)


_MEAN, _STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


def normalize(images, shared: bool = False) -> torch.Tensor:
    """uint8 images, a list of (3, H, W) or a batch, in any memory layout -> float32 batch
    (N, 3, H, W), normalised: the arithmetic of transforms.v2's ToDtype(float32, scale=True)
    then Normalize, bit for bit. Image by image into one output tensor, so that each image's
    floats stay in cache through the arithmetic. `shared`, for the tensor a DataLoader worker
    yields: allocated in shared memory, as default_collate allocates its batches, so that
    passing it to the main process copies nothing."""
    shape = (len(images), *images[0].shape)
    if shared and get_worker_info() is not None:
        out = torch.empty(0).set_(torch.UntypedStorage._new_shared(4 * math.prod(shape)), 0, shape)
    else:
        out = torch.empty(shape)
    for image, dest in zip(images, out):
        dest.copy_(image).mul_(1.0 / 255).sub_(_MEAN).div_(_STD)
    return out


def make_batch_transform(spec: TransformSpec, num_classes: int):
    """(uint8 images as for `normalize`, int labels) -> (normalised float images, targets): soft
    targets for training, labels for eval."""
    if not spec.train:
        return lambda images, labels: (normalize(images, shared=True), labels)
    mixers = []
    if spec.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=spec.mixup_alpha, num_classes=num_classes))
    if spec.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=spec.cutmix_alpha, num_classes=num_classes))
    mix = v2.RandomChoice(mixers) if mixers else None
    smoothing = spec.label_smoothing

    def apply(images: torch.Tensor, labels: torch.Tensor):
        mixing = mix is not None and len(labels) > 1
        images = normalize(images, shared=not mixing)  # mixing makes new tensors
        if mixing:
            images, targets = mix(images, labels)
        else:
            targets = torch.nn.functional.one_hot(labels, num_classes).float()
        # Smoothing commutes with mixing (both are linear), so it can come last.
        return images, targets * (1 - smoothing) + smoothing / num_classes

    return apply
