"""`python -m dataprep index` on shards written by webdataset's own ShardWriter (not by dataprep),
on a real S3 endpoint on loopback, in two label styles (.cls, and a .json field): rejected
samples and unreadable shards reported by shard and key, exact-once epochs through the keys CLI
at 3 ranks x 2 workers, a corrupt image counted at read time (or rejected by --verify), and a
short training run of the tiny config on the indexed shards."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
import webdataset as wds

from coatnet_scale.data import LoaderSpec, StreamingLoader, TransformSpec, epoch_keys
from corpus import jpeg_bytes, photo

REPO = Path(__file__).resolve().parent.parent
NAMES = ["ant", "bee", "cat"]
SAMPLES = 34
NO_IMAGE, NO_LABEL, CORRUPT = "s0005", "s0011", "s0017"


def write_wds_shards(folder, style: str) -> dict[str, int]:
    """34 samples, 10 per shard, through webdataset.ShardWriter; returns {good key: label}."""
    rng = np.random.default_rng(7)
    labels = {}
    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(SAMPLES):
            key, label = f"s{i:04d}", i % 3
            sample = {"__key__": key, "jpg": jpeg_bytes(photo(rng, 48, 40))}
            if style == "cls":
                sample["cls"] = label
            else:
                sample["json"] = {"label": NAMES[label], "caption": f"a photo of a {NAMES[label]}"}
            if key == NO_IMAGE:
                del sample["jpg"]
            elif key == NO_LABEL:
                del sample["cls" if style == "cls" else "json"]
            elif key == CORRUPT:
                sample["jpg"] = sample["jpg"][:30] + b"\0" * 200
            sink.write(sample)
            if key not in (NO_IMAGE, NO_LABEL):
                labels[key] = label
    return labels


def dataprep_index(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "dataprep", "index", *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"dataprep index {args} exited {result.returncode}:\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def s3_shards(tmp_path_factory, s3_endpoint):
    """Both label styles on S3 (plus a junk 'shard'), indexed; {style: (manifest url, labels, fs)}."""
    root = tmp_path_factory.mktemp("wds")
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir("wds")
    out = {}
    for style in ("cls", "json"):
        labels = write_wds_shards(root / style, style)
        fs.put(str(root / style), f"wds/{style}", recursive=True)
        fs.pipe_file(f"wds/{style}/shard-000004.tar", b"this is not a tar file" * 40)
        # 000004 is junk and 000005 does not exist: both are reported and left out.
        pattern = f"s3://wds/{style}/shard-{{000000..000005}}.tar"
        extra = ["--label-key", "label"] if style == "json" else []
        result = dataprep_index(pattern, f"s3://wds/{style}-index", "--workers", 2, *extra)
        out[style] = (f"s3://wds/{style}-index/manifest.json", labels, result.stderr)
    return out, fs


def test_index_counts_labels_and_reports_bad_input(s3_shards):
    shards, fs = s3_shards
    for style, classes in (("cls", ["0", "1", "2"]), ("json", NAMES)):
        url, labels, log = shards[style]
        manifest = json.loads(fs.cat_file(url))
        assert manifest["classes"] == classes
        assert manifest["labels"] == ({"member": "cls"} if style == "cls" else {"member": "json", "key": "label"})
        assert manifest["total_samples"] == len(labels) == SAMPLES - 2
        assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
        assert [s["samples"] for s in manifest["shards"]] == [9, 9, 10, 4]
        assert all(fs.exists(f"wds/{style}-index/{s['offsets']}") for s in manifest["shards"])
        assert not fs.exists(f"wds/{style}-index/_progress")
        rejected = [json.loads(line) for line in fs.cat_file(f"wds/{style}-index/rejected.jsonl").decode().splitlines()]
        by_key = {(r["shard"].rsplit("/", 1)[1], r["key"]): r["reason"] for r in rejected}
        assert by_key == {
            ("shard-000000.tar", NO_IMAGE): "no image", ("shard-000001.tar", NO_LABEL): "no label",
            ("shard-000004.tar", None): "unreadable shard", ("shard-000005.tar", None): "unreadable shard",
        }
        assert [u["url"].rsplit("/", 1)[1] for u in manifest["unreadable"]] == ["shard-000004.tar", "shard-000005.tar"]
        assert "cannot read s3://wds/" in log and "shard-000005.tar" in log
    # The index is a dataset dataprep can verify like its own.
    result = subprocess.run([sys.executable, "-m", "dataprep", "verify", "s3://wds/json-index"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_keys_cli_covers_every_sample_once_at_3_ranks_2_workers(s3_shards):
    shards, _ = s3_shards
    url, labels, _ = shards["cls"]
    processes = [
        subprocess.Popen([sys.executable, "-m", "coatnet_scale.data", "keys", url, "--rank", str(rank), "--world-size",
                          "3", "--num-workers", "2", "--epoch", "1", "--batch-size", "2", "--shuffle-buffer", "4"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(3)
    ]
    seen = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        seen += stdout.split()
    assert sorted(seen) == sorted(labels) and len(set(seen)) == len(seen)


def test_loader_reads_json_labels_and_counts_the_corrupt_image(s3_shards, s3_endpoint, caplog):
    shards, _ = s3_shards
    url, labels, _ = shards["json"]
    spec = LoaderSpec(url, 4, TransformSpec(image_size=32, train=False), num_workers=0, shuffle=False,
                      corrupt_limit=0.1, storage_options={"endpoint_url": s3_endpoint})
    with caplog.at_level(logging.WARNING):
        per_rank = [list(StreamingLoader(spec, rank, 2).epoch(0)) for rank in range(2)]
    for rank, batches in enumerate(per_rank):
        assert [k for b in batches for k in b["keys"]] == [k for k in epoch_keys(spec, rank, 2, 0) if k != CORRUPT]
    batches = per_rank[0] + per_rank[1]
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(set(labels) - {CORRUPT})
    got = {k: int(label) for b in batches for k, label in zip(b["keys"], b["labels"])}
    assert got == {k: v for k, v in labels.items() if k != CORRUPT}
    assert sum(b["corrupt"] for b in batches) == 1
    assert any(CORRUPT in r.getMessage() and "shard-000001.tar" in r.getMessage() for r in caplog.records)


def test_verify_rejects_the_corrupt_image_by_shard_and_key(s3_shards):
    shards, fs = s3_shards
    result = dataprep_index("s3://wds/json/shard-{000000..000003}.tar", "s3://wds/json-verified",
                            "--label-key", "label", "--verify", "--workers", 1)
    assert "3 samples rejected (" in result.stderr and "1 undecodable" in result.stderr and " ;" not in result.stderr
    manifest = json.loads(fs.cat_file("wds/json-verified/manifest.json"))
    assert manifest["total_samples"] == SAMPLES - 3 and manifest["rejected"]["undecodable"] == 1
    rejected = [json.loads(line) for line in fs.cat_file("wds/json-verified/rejected.jsonl").decode().splitlines()]
    assert {"shard": "s3://wds/json/shard-000001.tar", "key": CORRUPT, "reason": "undecodable"}.items() <= next(
        r for r in rejected if r["key"] == CORRUPT).items()


@pytest.mark.slow
def test_tiny_config_trains_on_indexed_shards(s3_shards, tmp_path):
    """The real entry point (local Ray, DeepSpeed ZeRO-3, 2 workers) on a --verify index."""
    dataprep_index("s3://wds/json/shard-{000000..000003}.tar", "s3://wds/json-train", "--label-key", "label", "--verify")
    manifest = "s3://wds/json-train/manifest.json"
    result = subprocess.run(
        [sys.executable, "-m", "coatnet_scale.pretrain", "--config", str(REPO / "configs" / "tiny.yaml"),
         f"--set=storage.url={tmp_path}", f"--set=data.train_manifest={manifest}", f"--set=data.val_manifest={manifest}",
         "--set=model.num_classes=3", "--set=train.total_steps=4", "--set=train.warmup_steps=1",
         "--set=train.global_batch_size=8", "--set=train.micro_batch_size=4", "--set=train.log_every=1",
         "--set=checkpoint.every_steps=4", "--set=monitoring.enabled=false"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "top-1" in result.stdout + result.stderr
