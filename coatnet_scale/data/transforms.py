"""Augmentation from torchvision's transforms.v2, built from a small spec.

Train: RandomResizedCrop, horizontal flip, RandAugment(n, m) per image (m on the paper's scale:
`PaperRandAugment`), in the loader's
workers, which hand over uint8 batches; then, per batch, on the training device
(`BatchTransform`): normalisation, Mixup or CutMix (one of them at random per batch) and label
smoothing, giving soft targets of shape (B, num_classes). Softmax and sigmoid losses take the
same soft targets: with sigmoid, each class is an independent on/off target smoothed toward
smoothing / num_classes. Eval: resize the shorter side to image_size / crop_ratio, centre crop,
normalise on the device; integer labels as targets.

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
            steps.append(PaperRandAugment(spec.randaugment_ops, spec.randaugment_magnitude))
    else:
        steps = [v2.Resize(round(spec.image_size / spec.crop_ratio), antialias=True), v2.CenterCrop(spec.image_size)]
    return v2.Compose([*steps, v2.ToImage()])


def make_sample_transform(spec: TransformSpec):
    """RGB PIL image -> uint8 tensor (3, image_size, image_size): `reference_sample_transform`,
    drawing the same random numbers in the same order (so the same crop, flip and RandAugment
    operations), computed faster. Differences from it are resampling noise only: the crop is
    resized by torch's uint8 antialiased bilinear kernel (vectorised; PIL's is not), which
    differs from PIL's by at most one level in a few pixels. Conversion to float and
    normalisation wait for the batch, on the training device (`BatchTransform`)."""
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


def _levels(strongest: float, bins: int, cap: float | None = None) -> torch.Tensor:
    """Magnitudes of levels 0 .. bins - 1: `strongest` at level 10, in proportion on either side."""
    values = torch.arange(bins) * (strongest / 10)
    return values if cap is None else values.clamp(max=cap)


class PaperRandAugment(v2.RandAugment):
    """torchvision's RandAugment with the magnitude on the scale the CoAtNet recipe's "RandAugment
    (2, 15)" is written in: RandAugment's own, as its TensorFlow code and timm define it, where
    level 10 is the strongest setting torchvision offers (rotate 30 degrees, shear 0.3, translate
    0.45 of the side, enhance by a factor 1 +- 0.9, posterize to 4 bits, solarize all) and every
    operation scales in proportion. Torchvision's own `magnitude=15` is half its scale of 30 bins
    (level 5); here 15 is level 15: rotate 45 degrees, shear 0.45, translate 0.68 of the side,
    posterize to 2 bits. Enhancement factors stay within 0.1 .. 1.9 (beyond, a factor 1 - 1.35 is
    negative: a black image), solarize at threshold 0 and posterize at 1 bit."""

    _AUGMENTATION_SPACE = {
        "Identity": (lambda bins, height, width: None, False),
        "ShearX": (lambda bins, height, width: _levels(0.3, bins), True),
        "ShearY": (lambda bins, height, width: _levels(0.3, bins), True),
        "TranslateX": (lambda bins, height, width: _levels(150.0 / 331.0 * width, bins), True),
        "TranslateY": (lambda bins, height, width: _levels(150.0 / 331.0 * height, bins), True),
        "Rotate": (lambda bins, height, width: _levels(30.0, bins), True),
        "Brightness": (lambda bins, height, width: _levels(0.9, bins, cap=0.9), True),
        "Color": (lambda bins, height, width: _levels(0.9, bins, cap=0.9), True),
        "Contrast": (lambda bins, height, width: _levels(0.9, bins, cap=0.9), True),
        "Sharpness": (lambda bins, height, width: _levels(0.9, bins, cap=0.9), True),
        "Posterize": (lambda bins, height, width: (8 - _levels(4.0, bins).round()).clamp(min=1).int(), False),
        "Solarize": (lambda bins, height, width: (1.0 - _levels(1.0, bins)).clamp(min=0.0), False),
        "AutoContrast": (lambda bins, height, width: None, False),
        "Equalize": (lambda bins, height, width: None, False),
    }

    def __init__(self, num_ops: int, magnitude: int, **kwargs):
        super().__init__(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=magnitude + 1, **kwargs)


class _RandAugment(PaperRandAugment):
    """PaperRandAugment for PIL images of one size: the same draws of operations and signs from
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


def stack(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 images (3, H, W), in any memory layout -> one contiguous uint8 batch (N, 3, H, W).
    In a DataLoader worker it is allocated in shared memory, as default_collate allocates its
    batches, so that passing it to the main process copies nothing."""
    shape = (len(images), *images[0].shape)
    if get_worker_info() is not None:
        out = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(math.prod(shape)), 0, shape)
    else:
        out = torch.empty(shape, dtype=torch.uint8)
    for image, dest in zip(images, out):
        dest.copy_(image)
    return out


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 batch (N, 3, H, W) -> float32 batch normalised, on the batch's device: the
    arithmetic of transforms.v2's ToDtype(float32, scale=True) then Normalize, bit for bit."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


class BatchTransform:
    """The per-batch part of the augmentation, run on the training device (as timm's fast loader
    and FFCV do): (uint8 images, int labels, seed) -> (normalised float images, targets). In
    training, Mixup or CutMix (one at random per batch, torchvision's) and label smoothing give
    soft targets of shape (B, num_classes); in evaluation the targets are the labels. The
    loader's worker draws `seed` with the rest of the batch's augmentation, and the mixing draws
    come from a CPU generator seeded with it, so a batch is mixed the same way on any device and
    after any resume, and the trainer's own random state is left alone."""

    def __init__(self, spec: TransformSpec, num_classes: int):
        self.train, self.num_classes, self.smoothing = spec.train, num_classes, spec.label_smoothing
        mixers = []
        if spec.train and spec.mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=spec.mixup_alpha, num_classes=num_classes))
        if spec.train and spec.cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=spec.cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(mixers) if mixers else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = normalize(images)
        if not self.train:
            return images, labels
        if self.mix is not None and len(labels) > 1:
            with torch.random.fork_rng(devices=[]):  # the CPU generator only: a GPU's stays as it was
                torch.default_generator.manual_seed(seed)
                images, targets = self.mix(images, labels)
        else:
            targets = torch.nn.functional.one_hot(labels, self.num_classes).float()
        # Smoothing commutes with mixing (both are linear), so it can come last.
        return images, targets * (1 - self.smoothing) + self.smoothing / self.num_classes
