"""dataprep end to end, as a user runs it (`python -m dataprep`), on local disk and real S3."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from corpus import BAD_INPUTS, jpeg_bytes, photo, write_image_folder


def dataprep(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dataprep", *map(str, args)], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"dataprep {args} exited {result.returncode}:\n{result.stderr}")
    return result


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_samples(urls: list[str]) -> list[dict]:
    """Every sample of the shards through plain webdataset, decoded by hand (no pickle)."""
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    good = write_image_folder(root, per_class=8)
    return root, good


def test_every_input_accounted_for(corpus, tmp_path):
    source, good = corpus
    out = tmp_path / "out"
    result = dataprep(source, out, "--samples-per-shard", 7, "--workers", 2, "--max-side", 64)
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(Counter(BAD_INPUTS.values()).items()))
    assert f"to {out}; rejected {len(BAD_INPUTS)} ({reasons}); " in result.stderr + result.stdout
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {r["path"]: r["reason"] for r in rejected} == BAD_INPUTS
    assert manifest["total_inputs"] == len(good) + len(BAD_INPUTS)
    assert manifest["total_samples"] == len(good)
    assert manifest["total_samples"] + len(rejected) == manifest["total_inputs"]
    assert sum(manifest["rejected"].values()) == len(BAD_INPUTS)
    assert manifest["classes"] == ["cat", "dog", "eel"]
    assert [s["name"] for s in manifest["shards"]] == [f"train-{i:06d}.tar" for i in range(len(manifest["shards"]))]
    # Each shard covers 7 consecutive shuffled inputs, less those it rejected.
    assert all(s["samples"] <= 7 for s in manifest["shards"])
    assert sum(s["samples"] == 7 for s in manifest["shards"]) >= len(manifest["shards"]) - len(BAD_INPUTS)
    assert not (out / "_progress").exists()

    samples = read_samples([str(out / s["name"]) for s in manifest["shards"]])
    assert len(samples) == len(good) and len({s["__key__"] for s in samples}) == len(good)
    by_source = {}
    for sample in samples:
        meta = json.loads(sample["json"])
        by_source[meta["source"]] = (sample, meta)
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert min(image.size) <= 64
        assert manifest["classes"][int(sample["cls"])] == meta["class"] == meta["source"].split("/")[0]
    assert set(by_source) == set(good)
    # Shuffled across classes: no shard holds a single class.
    for shard in manifest["shards"][:-1]:
        with tarfile.open(out / shard["name"]) as tar:
            labels = {tar.extractfile(m).read() for m in tar if m.name.endswith(".cls")}
        assert len(labels) > 1
    # EXIF orientation 6 applied: the 120x90 landscape original comes out portrait.
    sample, meta = by_source["eel/rotated.jpg"]
    assert (meta["width"], meta["height"]) == (120, 90)
    width, height = Image.open(io.BytesIO(sample["jpg"])).size
    assert height > width
    # The 16-bit PNG is scaled to 8 bits, not clipped to white.
    sixteen = np.asarray(Image.open(io.BytesIO(by_source["eel/sixteen.png"][0]["jpg"])))
    assert 40 < sixteen.mean() < 215


def test_pass_through_keeps_bytes(corpus, tmp_path):
    source, good = corpus
    out = tmp_path / "out"
    dataprep(source, out, "--workers", 1, "--max-side", 512)
    manifest = json.loads((out / "manifest.json").read_text())
    samples = read_samples([str(out / s["name"]) for s in manifest["shards"]])
    passed = 0
    for sample in samples:
        meta = json.loads(sample["json"])
        original = (source / meta["source"]).read_bytes()
        if good[meta["source"]] == "rgb jpeg":
            assert sample["jpg"] == original, meta["source"]
            passed += 1
        else:
            assert sample["jpg"] != original, f"{meta['source']} needed converting"
    assert passed == 24


def test_output_is_independent_of_workers(corpus, tmp_path):
    source, _ = corpus
    dataprep(source, tmp_path / "one", "--samples-per-shard", 5, "--workers", 1, "--max-side", 64)
    dataprep(source, tmp_path / "two", "--samples-per-shard", 5, "--workers", 2, "--max-side", 64)
    one, two = read_tree(tmp_path / "one"), read_tree(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) > 5
    assert one == two


def test_shard_bytes_sets_inputs_per_shard(corpus, tmp_path):
    """--shard-bytes picks inputs per shard from the mean input size; shards pass-through
    unchanged bytes here (--max-side 0), so they land near the target."""
    source, good = corpus
    out = tmp_path / "out"
    dataprep(source, out, "--shard-bytes", "40KiB", "--workers", 2, "--max-side", 0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) > 3
    full = manifest["shards"][:-1]
    assert 0.5 * 40 * 1024 < sum(s["bytes"] for s in full) / len(full) < 2 * 40 * 1024
    assert sum(s["samples"] for s in manifest["shards"]) == len(good)


def test_killed_run_resumes_to_identical_bytes(tmp_path):
    source = tmp_path / "big"
    rng = np.random.default_rng(1)
    for i in range(240):
        path = source / f"c{i % 4}" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(photo(rng, 500, 375)))
    args = ["--samples-per-shard", 10, "--max-side", 96, "--workers", 1]
    dataprep(source, tmp_path / "straight", *args)

    out = tmp_path / "resumed"
    process = subprocess.Popen([sys.executable, "-m", "dataprep", str(source), str(out), *map(str, args)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "_progress" / "000003.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "finished before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists(), "the kill came too late to test anything"
    written = sorted(p.name for p in out.glob("train-*.tar"))
    assert 4 <= len(written) < 24
    # Damage the newest shard the way a broken disk would: it must be rewritten, not trusted.
    (out / written[-1]).write_bytes(b"junk")

    result = dataprep(source, out, *args)
    resumed = re.search(r"resuming: (\d+) of 24 shards", result.stdout + result.stderr)
    assert resumed and int(resumed[1]) == len(written) - 1  # all but the damaged one kept
    assert read_tree(out) == read_tree(tmp_path / "straight")
    assert dataprep("verify", out).returncode == 0


def test_finished_dataset_is_not_redone_and_options_conflict_is_refused(corpus, tmp_path):
    source, _ = corpus
    out = tmp_path / "out"
    dataprep(source, out, "--max-side", 64)
    before = read_tree(out)
    again = dataprep(source, out, "--max-side", 64)
    assert "already complete" in again.stdout + again.stderr
    assert read_tree(out) == before
    conflict = dataprep(source, out, "--max-side", 32, check=False)
    assert conflict.returncode == 2 and "other inputs or options" in conflict.stderr
    assert read_tree(out) == before


def test_verify_names_the_damaged_shard(corpus, tmp_path):
    source, _ = corpus
    out = tmp_path / "out"
    dataprep(source, out, "--samples-per-shard", 10, "--max-side", 64)
    assert dataprep("verify", out).returncode == 0
    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first member's payload
    shard.write_bytes(bytes(data))
    (out / "train-000002.tar").unlink()
    result = dataprep("verify", out, check=False)
    assert result.returncode == 1
    assert "train-000001.tar: sha256 differs" in result.stdout
    assert "train-000002.tar: missing" in result.stdout


def test_tar_of_class_tars(tmp_path):
    """ImageNet's training archive layout, read in place."""
    rng = np.random.default_rng(2)
    outer_path = tmp_path / "ILSVRC_train.tar"
    expected = {}
    with tarfile.open(outer_path, "w") as outer:
        for synset in ("n01440764", "n01443537"):
            inner_buffer = io.BytesIO()
            with tarfile.open(fileobj=inner_buffer, mode="w") as inner:
                for i in range(5):
                    data = jpeg_bytes(photo(rng))
                    info = tarfile.TarInfo(f"{synset}_{i}.JPEG")
                    info.size = len(data)
                    inner.addfile(info, io.BytesIO(data))
                    expected[f"{synset}_{i}.JPEG"] = data
            info = tarfile.TarInfo(f"{synset}.tar")
            info.size = inner_buffer.tell()
            outer.addfile(info, io.BytesIO(inner_buffer.getvalue()))
    out = tmp_path / "out"
    dataprep(outer_path, out, "--workers", 2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["n01440764", "n01443537"] and manifest["total_samples"] == 10
    for sample in read_samples([str(out / s["name"]) for s in manifest["shards"]]):
        meta = json.loads(sample["json"])
        name = meta["source"].rsplit("/", 1)[1]
        assert sample["jpg"] == expected[name]  # passed through byte for byte
        assert manifest["classes"][int(sample["cls"])] == name.split("_")[0]


def test_killed_listing_of_a_tar_of_tars_resumes_without_listing_again(tmp_path):
    """Killed while its workers list the inner tars, a rerun lists only those not yet listed;
    killed after listing, a rerun reuses the whole saved listing; the output is unchanged."""
    rng = np.random.default_rng(4)
    outer_path = tmp_path / "archive.tar"
    image = jpeg_bytes(photo(rng, 40, 32))
    inner_count = 300
    with tarfile.open(outer_path, "w") as outer:
        for c in range(inner_count):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as inner:
                for i in range(2):
                    info = tarfile.TarInfo(f"n{c:04d}_{i}.JPEG")
                    info.size = len(image)
                    inner.addfile(info, io.BytesIO(image))
            info = tarfile.TarInfo(f"n{c:04d}.tar")
            info.size = buffer.tell()
            outer.addfile(info, io.BytesIO(buffer.getvalue()))
    args = ["--samples-per-shard", 50, "--workers", 1, "--min-side", 8]
    dataprep(outer_path, tmp_path / "straight", *args)

    out = tmp_path / "resumed"
    parts = out / "_progress" / "listing" / "parts"
    command = [sys.executable, "-m", "dataprep", str(outer_path), str(out), *map(str, args)]

    def run_until(condition) -> str:
        log = tmp_path / "log.txt"
        with open(log, "w") as f:
            process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 120
            while not condition():
                assert process.poll() is None and time.monotonic() < deadline, "finished before it could be killed"
                time.sleep(0.005)
            process.send_signal(signal.SIGSTOP)  # nothing more is saved between the count below and the kill
            process.send_signal(signal.SIGKILL)
            process.wait()
        return log.read_text()

    run_until(lambda: len(list(parts.glob("0*.npz"))) >= 3 if parts.exists() else False)
    listed = len(list(parts.glob("0*.npz")))
    assert 3 <= listed < inner_count and not (out / "_progress" / "listing" / "listing.npz").exists()
    log = run_until(lambda: (out / "_progress" / "listing" / "listing.npz").exists())
    assert f"listing: {listed} of {inner_count} inner tars already listed" in log
    assert not (out / "manifest.json").exists()
    result = dataprep(outer_path, out, *args)
    assert "reusing the saved listing" in result.stdout + result.stderr
    assert read_tree(out) == read_tree(tmp_path / "straight")


@pytest.mark.parametrize("labels_format", ["csv", "jsonl"])
def test_folder_with_labels_file_and_fixed_classes(tmp_path, labels_format):
    """ImageNet's validation layout: loose images plus a labels file, labelled in the train
    split's class order."""
    rng = np.random.default_rng(3)
    images = tmp_path / "val"
    images.mkdir()
    labels = {}
    for i in range(6):
        (images / f"v{i}.jpg").write_bytes(jpeg_bytes(photo(rng)))
        labels[f"v{i}.jpg"] = ["zebra", "ant"][i % 2]
    (images / "unlisted.jpg").write_bytes(jpeg_bytes(photo(rng)))
    labels["gone.jpg"] = "ant"
    if labels_format == "csv":
        labels_file = tmp_path / "labels.csv"
        labels_file.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in labels.items()))
    else:
        labels_file = tmp_path / "labels.jsonl"
        labels_file.write_text("".join(json.dumps({"path": p, "label": c}) + "\n" for p, c in labels.items()))
    classes = tmp_path / "classes.txt"
    classes.write_text("zebra\nant\n")  # not alphabetical: the order must be kept
    out = tmp_path / "out"
    dataprep(images, out, "--labels", labels_file, "--classes", classes, "--split", "val")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["zebra", "ant"]
    assert manifest["rejected"] == {"missing file": 1, "no label": 1}
    assert manifest["total_inputs"] == 8 and manifest["total_samples"] == 6
    assert manifest["shards"][0]["name"] == "val-000000.tar"
    for sample in read_samples([str(out / s["name"]) for s in manifest["shards"]]):
        meta = json.loads(sample["json"])
        assert manifest["classes"][int(sample["cls"])] == labels[meta["source"]]


def test_bad_source_gives_clear_error(tmp_path):
    result = dataprep(tmp_path / "nowhere", tmp_path / "out", check=False)
    assert result.returncode == 2 and "SOURCE not found" in result.stderr and "Traceback" not in result.stderr
    bad_labels = tmp_path / "labels.csv"
    bad_labels.write_text("file,class\nx.jpg,1\n")
    (tmp_path / "imgs").mkdir()
    result = dataprep(tmp_path / "imgs", tmp_path / "out", "--labels", bad_labels, check=False)
    assert result.returncode == 2 and "path,label" in result.stderr


def test_s3_source_and_destination(corpus, s3_endpoint, s3_bucket, tmp_path):
    """Shards to a real S3 endpoint on loopback and back; credentials stay out of output."""
    source, good = corpus
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.put(str(source), f"{s3_bucket}/corpus", recursive=True)
    dest = f"s3://{s3_bucket}/shards/train"
    result = dataprep(f"s3://{s3_bucket}/corpus", dest, "--samples-per-shard", 9, "--max-side", 64, "--workers", 2)
    for secret in (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]):
        assert secret not in result.stdout + result.stderr
    manifest_text = fs.cat_file(f"{s3_bucket}/shards/train/manifest.json").decode()
    assert "testing-secret-key" not in manifest_text
    manifest = json.loads(manifest_text)
    assert manifest["total_samples"] == len(good)
    assert sorted(fs.ls(f"{s3_bucket}/shards/train", detail=False)) == sorted(
        [f"{s3_bucket}/shards/train/{n}" for n in ("manifest.json", "rejected.jsonl")]
        + [f"{s3_bucket}/shards/train/{s[field]}" for s in manifest["shards"] for field in ("name", "offsets")]
    )
    assert dataprep("verify", dest).returncode == 0
    # Identical bytes to a local run of the same corpus and options.
    dataprep(source, tmp_path / "local", "--samples-per-shard", 9, "--max-side", 64)
    local_manifest = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert [s["sha256"] for s in local_manifest["shards"]] == [s["sha256"] for s in manifest["shards"]]


@pytest.mark.slow
def test_ray_workers_give_identical_output(corpus, tmp_path):
    """--ray with no address starts a local Ray instance; shards are Ray tasks."""
    source, _ = corpus
    args = ["--samples-per-shard", 6, "--max-side", 64, "--workers", 2]
    dataprep(source, tmp_path / "local", *args)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    dataprep(source, tmp_path / "ray", *args, "--ray", env=env, timeout=300)
    assert read_tree(tmp_path / "ray") == read_tree(tmp_path / "local")


def test_shuffle_order_matches_random_shuffle():
    """The compact shuffle keeps every existing dataset's shard contents."""
    import random

    from dataprep.prep import shuffled_order

    for n in (0, 1, 2, 1000):
        expected = list(range(n))
        random.Random(5).shuffle(expected)
        assert shuffled_order(n, 5).tolist() == expected


# -- parquet, as the Hugging Face Hub lays out image datasets ------------------------------------


def test_hub_parquet_keeps_its_class_names_and_bytes_and_names_its_bad_rows(hub_parquet):
    """conftest's hub_parquet: pyarrow wrote the files (image {bytes, path}, ClassLabel names in
    the schema's features metadata), `python -m dataprep` sharded them."""
    import pyarrow.parquet as pq

    from corpus import DIGIT_NAMES

    shards, parquet, bad = hub_parquet
    train = json.loads((shards / "train" / "manifest.json").read_text())
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parquet.glob("train-*.parquet"))
    assert train["classes"] == DIGIT_NAMES  # the metadata's names, not the column's values 0-9
    assert (train["total_inputs"], train["total_samples"]) == (rows, rows - len(bad))
    rejected = [json.loads(line) for line in (shards / "train" / "rejected.jsonl").read_text().splitlines()]
    assert sorted((r["path"].rpartition("/")[2], r["reason"]) for r in rejected) == sorted(bad)
    assert "lost.jpg" in next(r["detail"] for r in rejected if r["reason"] == "missing image")
    # Every image is the parquet's bytes as they were, labelled as its row was.
    table = pq.read_table(parquet / "train-00001-of-00002.parquet")
    cells, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
    samples = read_samples([str(p) for p in sorted((shards / "train").glob("*.tar"))])
    mine = {s["__key__"]: s for s in samples if s["__key__"].startswith("train-00001-of-00002-")}
    assert len(mine) == len(cells)
    for key, sample in mine.items():
        row = int(key.rpartition("-")[2])
        assert sample["jpg"] == cells[row]["bytes"] and int(sample["cls"]) == labels[row]
        assert json.loads(sample["json"])["source"].endswith(f"train-00001-of-00002.parquet#row={row}")
    val = json.loads((shards / "val" / "manifest.json").read_text())
    assert val["classes"] == DIGIT_NAMES and val["total_samples"] == 359 and val["rejected"] == {}
    assert dataprep("verify", shards / "train").returncode == 0


def test_parquet_without_features_takes_the_labels_found_and_resizes_only_when_asked(tmp_path):
    """No Hugging Face metadata: the classes are the label column's distinct values; PNGs stay
    PNGs unless --max-side asks for smaller; a missing column is named with the file."""
    from corpus import write_parquet

    rng = np.random.default_rng(1)
    png = io.BytesIO()
    Image.fromarray(photo(rng, 96, 64)).save(png, "PNG")
    rows = [(png.getvalue(), f"{i}.png", ["tulip", "rose", "iris"][i % 3]) for i in range(9)]
    write_parquet(tmp_path / "flowers.parquet", rows, row_group_size=4)
    kept = dataprep(tmp_path / "flowers.parquet", tmp_path / "kept", "--workers", 1)
    assert "9 rows in 1 parquet file(s), 3 classes" in kept.stdout + kept.stderr
    manifest = json.loads((tmp_path / "kept" / "manifest.json").read_text())
    assert manifest["classes"] == ["iris", "rose", "tulip"] and manifest["total_samples"] == 9
    samples = read_samples([str(p) for p in sorted((tmp_path / "kept").glob("*.tar"))])
    assert all(s["png"] == png.getvalue() for s in samples)
    dataprep(tmp_path / "flowers.parquet", tmp_path / "small", "--workers", 1, "--max-side", 32, "--min-side", 8)
    samples = read_samples([str(p) for p in sorted((tmp_path / "small").glob("*.tar"))])
    assert len(samples) == 9 and all(Image.open(io.BytesIO(s["jpg"])).size == (48, 32) for s in samples)
    wrong = dataprep(tmp_path / "flowers.parquet", tmp_path / "wrong", "--label-column", "species", check=False)
    assert wrong.returncode == 2
    assert re.search(r"flowers.parquet: no column species; it has image, label \(--image-column, --label-column\)",
                     wrong.stderr), wrong.stderr


def test_parquet_from_s3_by_glob(hub_parquet, s3_bucket, tmp_path):
    """An object-storage URL with a glob, read in place: the same samples as from local disk."""
    import s3fs

    shards, parquet, _ = hub_parquet
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for path in parquet.glob("train-*.parquet"):
        fs.put_file(str(path), f"{s3_bucket}/imagenet-like/data/{path.name}")
    dataprep(f"s3://{s3_bucket}/imagenet-like/data/train-*.parquet", tmp_path / "out", "--split", "train",
             "--samples-per-shard", 64, "--workers", 2)
    mine = read_samples([str(p) for p in sorted((tmp_path / "out").glob("*.tar"))])
    local = read_samples([str(p) for p in sorted((shards / "train").glob("*.tar"))])
    assert [(s["__key__"], s["jpg"], s["cls"]) for s in mine] == [(s["__key__"], s["jpg"], s["cls"]) for s in local]
    assert json.loads(mine[0]["json"])["source"].startswith(f"s3://{s3_bucket}/imagenet-like/data/train-0000")


@pytest.mark.slow
def test_parquet_under_ray_gives_identical_output(hub_parquet, tmp_path):
    shards, parquet, _ = hub_parquet
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    dataprep(parquet / "train-*.parquet", tmp_path / "train", "--split", "train", "--samples-per-shard", 64,
             "--workers", 2, "--ray", env=env, timeout=300)
    assert read_tree(tmp_path / "train") == read_tree(shards / "train")
