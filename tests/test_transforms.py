"""The loader's per-sample path against the libraries it replaces. The sample transform against
torchvision's transforms.v2 composed as usual (`reference_sample_transform`): the same random
draws, so the same crops, flips and RandAugment operations; outputs equal except for the crop's
resize, torch's uint8 kernel against PIL's, which may differ by one level in a pixel; the batch
normalisation bit for bit, and the mixing as torchvision draws it. The plain tar reader against
tarfile."""
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, IterableDataset
from torchvision.transforms import v2

from coatnet_scale.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, BatchTransform, PaperRandAugment, TransformSpec, _RandAugment, _smooth,
    make_sample_transform, normalize, reference_sample_transform, stack,
)
from corpus import photo
from coatnet_scale.shard_format import iter_samples


def images(count, seed=0, sizes=((160, 120), (90, 130), (48, 40))):
    """Photo-like RGB images with sensor noise, of sizes above and below the crop size, so
    that crops are both shrunk and enlarged."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        noisy = photo(rng, width, height) + rng.normal(0, 12, (height, width, 3))
        out.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return out


def both(spec, image, seed):
    """(reference output, fast output), each from the same torch seed, and whether the two
    left torch's generator in the same state, i.e. drew the same random numbers."""
    outputs, states = [], []
    for transform in (reference_sample_transform(spec), make_sample_transform(spec)):
        torch.manual_seed(seed)
        outputs.append(transform(image).to(torch.int16))
        states.append(torch.get_rng_state())
    return *outputs, torch.equal(*states)


def test_crop_flip_and_resize_differ_only_by_resampling_noise():
    spec = TransformSpec(image_size=64, randaugment_ops=0)
    differing = total = 0
    for seed, image in enumerate(images(60)):
        ref, fast, same_draws = both(spec, image, seed)
        assert same_draws and ref.shape == fast.shape == (3, 64, 64)
        assert (ref - fast).abs().max() <= 1, f"image {seed}"
        differing, total = differing + int((ref != fast).sum()), total + ref.numel()
    assert differing < 0.05 * total


def test_randaugment_is_the_references_bit_for_bit():
    ours, theirs = _RandAugment(2, 15, 64), PaperRandAugment(2, 15)
    for name, (magnitudes, signed) in theirs._AUGMENTATION_SPACE.items():  # every operation, both signs
        values = magnitudes(theirs.num_magnitude_bins, 64, 64)
        magnitude = 0.0 if values is None else float(values[theirs.magnitude])
        for m in {magnitude, -magnitude if signed else magnitude}:
            image = images(1, seed=len(name), sizes=((64, 64),))[0]
            expect = theirs._apply_image_or_video_transform(image, name, m, theirs.interpolation, theirs._fill)
            got = ours._apply_image_or_video_transform(image, name, m, ours.interpolation, ours._fill)
            assert np.array_equal(np.asarray(got), np.asarray(expect)), (name, m)
    for seed, image in enumerate(images(40, sizes=((64, 64),))):  # the draws: which operations, which signs
        torch.manual_seed(seed)
        expect = theirs(image)
        torch.manual_seed(seed)
        assert np.array_equal(np.asarray(ours(image)), np.asarray(expect)), seed


def magnitudes_at(augment, size=224) -> dict:
    return {name: None if (values := fn(augment.num_magnitude_bins, size, size)) is None else float(values[augment.magnitude])
            for name, (fn, _) in augment._AUGMENTATION_SPACE.items()}


def test_randaugment_magnitude_is_on_the_papers_scale():
    """The recipe's "RandAugment (2, 15)" is on RandAugment's own scale (its TensorFlow code, timm):
    level 10 is torchvision's strongest setting and operations scale in proportion. Torchvision's
    magnitude 15 of its 31 bins would be level 5, a third as strong."""
    for level in (0, 5, 9, 10):  # torchvision with 11 bins is that scale up to 10
        tv = magnitudes_at(v2.RandAugment(2, level, num_magnitude_bins=11))
        ours = magnitudes_at(PaperRandAugment(2, level))
        assert tv.keys() == ours.keys()
        for name in tv:
            assert (tv[name] is None and ours[name] is None) or tv[name] == pytest.approx(ours[name], rel=1e-6, abs=1e-6), (level, name)
    at15 = magnitudes_at(PaperRandAugment(2, 15))
    assert at15["Rotate"] == pytest.approx(45.0) and at15["ShearX"] == pytest.approx(0.45)
    assert at15["TranslateX"] == pytest.approx(1.5 * 150 / 331 * 224)
    assert at15["Posterize"] == 2 and at15["Solarize"] == 0.0
    assert all(at15[name] == pytest.approx(0.9) for name in ("Brightness", "Color", "Contrast", "Sharpness"))
    assert magnitudes_at(v2.RandAugment(2, 15))["Rotate"] == pytest.approx(15.0)  # what the configs' 15 meant before


@pytest.mark.parametrize("size", [(3, 3), (4, 9), (37, 23)])
def test_smooth_is_pils_filter(size):
    image = images(1, sizes=(size,))[0]
    assert np.array_equal(np.asarray(_smooth(image)), np.asarray(image.filter(ImageFilter.SMOOTH)))


def test_whole_train_transform_draws_as_torchvision():
    spec = TransformSpec(image_size=64)
    mean_differences = []
    for seed, image in enumerate(images(30)):
        ref, fast, same_draws = both(spec, image, seed)
        assert same_draws, f"image {seed}"
        mean_differences.append(float((ref - fast).abs().float().mean()))
    # After RandAugment a one-level resampling difference can cross Solarize's threshold or
    # move an Equalize bin, but on average the images agree to a small fraction of a level.
    assert np.mean(mean_differences) < 0.3, mean_differences


def test_eval_transform_is_the_reference():
    spec = TransformSpec(image_size=64, train=False)
    for image in images(3):
        assert torch.equal(make_sample_transform(spec)(image), reference_sample_transform(spec)(image))


class _Batches(IterableDataset):
    def __iter__(self):
        yield stack([torch.zeros(3, 4, 4, dtype=torch.uint8)])


def test_stack_makes_one_contiguous_batch_in_shared_memory_from_a_worker():
    images = list(torch.randint(0, 256, (5, 20, 30, 4), dtype=torch.uint8).permute(0, 3, 1, 2)[:, :3])  # as PIL's RGBX
    batch = stack(images)
    assert batch.is_contiguous() and torch.equal(batch, torch.stack(images)) and not batch.is_shared()
    # Yielded from a DataLoader worker, the batch is already in shared memory (no copy).
    (from_worker,) = DataLoader(_Batches(), batch_size=None, num_workers=1, multiprocessing_context="fork")
    assert from_worker.is_shared() and from_worker.dtype == torch.uint8


def test_normalize_is_torchvisions_per_image_arithmetic():
    per_image = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    batch = torch.randint(0, 256, (5, 3, 20, 30), dtype=torch.uint8)
    assert torch.equal(normalize(batch), torch.stack([per_image(image) for image in batch]))


def test_batch_transform_is_torchvisions_mixing_drawn_from_its_seed():
    """Mixup/CutMix as v2.RandomChoice draws them under the batch's seed, whatever the caller's
    random state, which stays untouched; then label smoothing."""
    spec, classes = TransformSpec(image_size=16, label_smoothing=0.1), 5
    transform = BatchTransform(spec, classes)
    images, labels = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8), torch.arange(6) % classes
    mix = v2.RandomChoice([v2.MixUp(alpha=spec.mixup_alpha, num_classes=classes),
                           v2.CutMix(alpha=spec.cutmix_alpha, num_classes=classes)])
    outputs = []
    for seed in range(6):
        torch.manual_seed(seed)
        expect_images, expect_targets = mix(normalize(images), labels)
        torch.manual_seed(1000 + seed)  # the caller's state: neither used nor moved
        state = torch.get_rng_state()
        got_images, got_targets = transform(images, labels, seed)
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(got_images, expect_images)
        torch.testing.assert_close(got_targets, expect_targets * 0.9 + 0.1 / classes)
        torch.testing.assert_close(got_targets.sum(1), torch.ones(6))
        outputs.append(got_images)
    assert not all(torch.equal(outputs[0], o) for o in outputs[1:])  # the seed matters
    evaluation = BatchTransform(TransformSpec(image_size=16, train=False), classes)
    got_images, got_labels = evaluation(images, labels, 0)
    assert torch.equal(got_images, normalize(images)) and torch.equal(got_labels, labels)


def tar_of_every_kind(format_) -> bytes:
    """Members as shard writers make them: long and prefixed names (GNU long-name or pax
    headers), non-ASCII names, directories, links, a __meta__ file, an empty member."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format_) as tar:
        def add(name, data=b"", kind=tarfile.REGTYPE, **fields):
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            for field, value in fields.items():
                setattr(info, field, value)
            tar.addfile(info, io.BytesIO(data))

        add("__meta__.json", b"{}")
        add("shard", kind=tarfile.DIRTYPE)
        for i in range(3):
            add(f"shard/{i:03d}.jpg", bytes(range(40 * i)) * 7)
            add(f"shard/{i:03d}.cls", str(i).encode())
            add(f"shard/{i:03d}.json", b'{"label": 1}')
        add("y" * 90 + "/" + "z" * 60 + ".jpg", b"prefixed")
        if format_ != tarfile.USTAR_FORMAT:
            add("long/" + "x" * 150 + ".jpg", b"long")
            add("long/näme.jpg", b"unicode")
        add("link.jpg", kind=tarfile.SYMTYPE, linkname="shard/000.jpg")
        add("empty.jpg")
        add("empty.cls", b"1")
    return buffer.getvalue()


@pytest.mark.parametrize("format_", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_plain_tar_reader_is_tarfiles(format_):
    data = tar_of_every_kind(format_)
    for wanted in (lambda ext: True, lambda ext: ext == "jpg"):
        expect = list(iter_samples(io.BytesIO(data), wanted, base=7))  # tarfile
        assert list(iter_samples(io.BytesIO(data), wanted, base=7, mode="r|")) == expect
    end = expect[-1]["__end__"] - 7  # a ranged read stops at a sample's end, before the end-of-archive blocks
    assert list(iter_samples(io.BytesIO(data[:end]), wanted, mode="r|")) == list(iter_samples(io.BytesIO(data), wanted))
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        list(iter_samples(io.BytesIO(data[:end - 100]), mode="r|"))
