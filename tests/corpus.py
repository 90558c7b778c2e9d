"""Test corpora written by the tests themselves: good images in every mode dataprep must
convert, and every kind of bad input it must reject."""
import io
import os

import numpy as np
from PIL import Image

# file name -> the reason dataprep must give for rejecting it
BAD_INPUTS = {
    "cat/empty.jpg": "empty file",
    "dog/notes.txt": "not an image",
    "dog/truncated.jpg": "undecodable",
    "eel/garbled.png": "undecodable",
    "eel/bomb.png": "decompression bomb",
    "eel/tiny.png": "too small",
    "stray.jpg": "not in a class folder",
}


def photo(rng, width=120, height=90) -> np.ndarray:
    """A smooth random image (compresses like a photo, unlike white noise)."""
    small = rng.random((height // 8 + 1, width // 8 + 1, 3))
    big = np.kron(small, np.ones((8, 8, 1)))[:height, :width]
    return (big * 255).astype(np.uint8)


def jpeg_bytes(array: np.ndarray, **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "JPEG", quality=90, **save)
    return out.getvalue()


def write_image_folder(root, per_class: int = 8, seed: int = 0, width=120, height=90) -> dict[str, str]:
    """Good images of every mode in three classes, plus BAD_INPUTS. Returns {good path: kind}."""
    rng = np.random.default_rng(seed)
    good = {}
    for class_name in ("cat", "dog", "eel"):
        os.makedirs(os.path.join(root, class_name), exist_ok=True)
        for i in range(per_class):
            path = f"{class_name}/{i:03d}.jpg"
            with open(os.path.join(root, path), "wb") as f:
                f.write(jpeg_bytes(photo(rng, width, height)))
            good[path] = "rgb jpeg"
    pixels = photo(rng)
    special = {
        "cat/cmyk.jpg": lambda p: Image.fromarray(pixels).convert("CMYK").save(p, "JPEG"),
        "cat/gray.png": lambda p: Image.fromarray(pixels).convert("L").save(p),
        "dog/palette.gif": lambda p: Image.fromarray(pixels).convert("P").save(p, transparency=0),
        "dog/alpha.png": lambda p: Image.fromarray(pixels).convert("RGBA").save(p),
        "eel/sixteen.png": lambda p: Image.fromarray((pixels[..., 0].astype(np.uint16) * 257)).save(p),
        "eel/rotated.jpg": lambda p: _save_rotated(pixels, p),
        "eel/huge.jpg": lambda p: Image.fromarray(photo(rng, 1200, 900)).save(p, quality=90),
    }
    for path, save in special.items():
        save(os.path.join(root, path))
        good[path] = path.split("/")[1].split(".")[0]
    sample = jpeg_bytes(photo(rng))
    bad = {
        "cat/empty.jpg": b"",
        "dog/notes.txt": b"class notes, not a picture\n",
        "dog/truncated.jpg": sample[: len(sample) // 2],
        "eel/garbled.png": _png_bytes(pixels)[:60] + b"\0" * 200,
        "eel/tiny.png": _png_bytes(pixels[:10, :10]),
        "stray.jpg": sample,
    }
    for path, data in bad.items():
        with open(os.path.join(root, path), "wb") as f:
            f.write(data)
    # 12000 x 12000 one-bit pixels: 144M pixels from a few kB of PNG.
    Image.new("1", (12000, 12000)).save(os.path.join(root, "eel/bomb.png"))
    return good


def _png_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def _save_rotated(pixels: np.ndarray, path: str) -> None:
    """Stored landscape with EXIF orientation 6: displays as portrait."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, "JPEG", quality=90, exif=exif)


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def hf_schema_metadata(names: list[str] | None) -> dict:
    """The `huggingface` key of a Hub parquet file's schema metadata: the dataset's features."""
    import json

    label = {"names": names, "_type": "ClassLabel"} if names else {"dtype": "string", "_type": "Value"}
    return {"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}, "label": label}}})}


def write_parquet(path, rows: list[tuple], names: list[str] | None = None, row_group_size: int = 128) -> None:
    """Rows (image bytes or None, original path, label or None) as the Hub lays them out: image
    a struct {bytes, path}, label an int64 ClassLabel index (with `names`) or a string; written
    by pyarrow alone, not by dataprep."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    label = pa.int64() if names else pa.string()
    table = pa.table({"image": pa.array([None if b is None and p is None else {"bytes": b, "path": p}
                                         for b, p, _ in rows], image),
                      "label": pa.array([lab for _, _, lab in rows], label)})
    table = table.replace_schema_metadata(hf_schema_metadata(names))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


def digits_as_hub_parquet(raw, dest, train_files: int = 2) -> list[dict]:
    """The demo corpus's digit folders (raw/{train,val}/<digit>/*.jpg) as the Hub lays out an
    image dataset: dest/train-0000K-of-0000N.parquet and dest/validation-00000-of-00001.parquet,
    rows shuffled, class names from the features metadata. Three bad rows go into the first
    train file; returns what dataprep must reject, as (path suffix, reason)."""
    rng = np.random.default_rng(0)
    bad = [(None, "lost.jpg", 3), (b"not an image at all", "garbled.jpg", 4)]
    for split, files in (("train", train_files), ("validation", 1)):
        folder = raw / ("train" if split == "train" else "val")
        rows = [(p.read_bytes(), p.name, int(p.parent.name)) for p in sorted(folder.glob("*/*.jpg"))]
        rows = [rows[i] for i in rng.permutation(len(rows))]
        parts = [rows[k::files] for k in range(files)]
        if split == "train":
            parts[0] = bad + parts[0]
            parts[0].insert(5, (parts[0][5][0], "unlabelled.jpg", None))
        for k, part in enumerate(parts):
            write_parquet(dest / f"{split}-{k:05d}-of-{files:05d}.parquet", part, DIGIT_NAMES)
    first = f"train-00000-of-{train_files:05d}.parquet"
    return [(f"{first}#row=0", "missing image"), (f"{first}#row=1", "not an image"), (f"{first}#row=5", "no label")]
