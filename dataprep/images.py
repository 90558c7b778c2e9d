"""One input image in, one RGB JPEG out, or a `Rejected` with the reason.

Runs in the worker processes. A JPEG that is already RGB, upright and within the size limits
passes through byte for byte, after a cheap 1/8-scale decode that proves it is complete.
`keep_image` (parquet inputs) keeps any JPEG, PNG or WebP as it is, once it decodes, unless it
must shrink. Everything else is decoded (JPEGs at a reduced DCT scale when shrinking), EXIF-rotated,
converted to RGB, resized so the shorter side is at most `max_side`, and re-encoded.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# We enforce our own pixel limit from the header (max_pixels) before anything is decoded.
Image.MAX_IMAGE_PIXELS = None

EXIF_ORIENTATION = 0x0112


class Rejected(Exception):
    """An input that cannot become a sample. `reason` is one of a small fixed vocabulary
    (counted in the manifest); `detail` says more about this one file."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageOptions:
    max_side: int = 512  # shorter side is resized down to this; 0 keeps the original size
    min_side: int = 32  # reject images whose shorter side is below this
    quality: int = 90
    max_pixels: int = 89_478_485  # PIL's own decompression-bomb threshold


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit (and 32-bit) grayscale: scale to 8 bits rather than clip at 255.
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))  # transparent -> white
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    shorter = min(width, height)
    if not max_side or shorter <= max_side:
        return width, height
    scale = max_side / shorter
    return max(max_side, round(width * scale)), max(max_side, round(height * scale))


def _open(data: bytes) -> Image.Image:
    """The image's header read (pixels not yet decoded), or Rejected."""
    if not data:
        raise Rejected("empty file")
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Rejected("not an image") from None
    except Exception as e:  # PIL raises many types on malformed headers
        raise Rejected("undecodable", f"{type(e).__name__}: {e}") from None


def convert_image(data: bytes, options: ImageOptions) -> tuple[bytes, int, int]:
    """Return (jpeg_bytes, original_width, original_height), or raise Rejected."""
    img = _open(data)
    width, height = img.size
    if width * height > options.max_pixels:
        raise Rejected("decompression bomb", f"{width}x{height} pixels exceeds {options.max_pixels}")
    if min(width, height) < options.min_side:
        raise Rejected("too small", f"{width}x{height}, shorter side below {options.min_side}")
    target = _target_size(width, height, options.max_side)
    try:
        # JPEG keeps EXIF in its header; other formats decode the whole image to find it, so a
        # damaged PNG fails here, and must not be retried (a second load() "succeeds").
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        if img.format == "JPEG" and img.mode == "RGB" and orientation == 1 and target == (width, height):
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            img.load()  # a truncated file fails here, even at 1/8 scale
            return data, width, height
        if img.format == "JPEG" and target != (width, height):
            img.draft(img.mode, target)  # decode at the smallest DCT scale still >= target
        img.load()
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except Rejected:
        raise
    except Exception as e:
        raise Rejected("undecodable", f"{type(e).__name__}: {e}") from None
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: the target swaps too
        target = target[::-1]
    if img.size != target:
        img = img.resize(target, Image.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=options.quality)
    return out.getvalue(), width, height


KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # what the training loader decodes


def keep_image(data: bytes, options: ImageOptions) -> tuple[bytes, str, int, int]:
    """(bytes, extension, width, height): the input itself when it is a JPEG, PNG or WebP that
    decodes and needs no resize (a JPEG is proven complete by a 1/8-scale decode), else
    `convert_image`'s JPEG. Raises Rejected as convert_image does."""
    img = _open(data)
    width, height = img.size
    if img.format not in KEPT_FORMATS or _target_size(width, height, options.max_side) != (width, height) or \
            width * height > options.max_pixels or min(width, height) < options.min_side:
        return (*convert_image(data, options)[:1], "jpg", width, height)
    try:
        if img.format == "JPEG":
            img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
        img.load()
    except Exception as e:
        raise Rejected("undecodable", f"{type(e).__name__}: {e}") from None
    return data, KEPT_FORMATS[img.format], width, height
