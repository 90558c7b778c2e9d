"""The streaming loader: exactly-once epochs across ranks and workers, deterministic order,
exact mid-epoch resume, bad samples, S3, and the `keys` inspection CLI."""
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from coatnet_scale.data import CorruptDataError, LoaderSpec, StreamingLoader, TransformSpec, epoch_keys
from corpus import jpeg_bytes, photo
from dataprep.images import ImageOptions
from dataprep.prep import PrepOptions, prepare


def make_shards(root, count=53, per_shard=7, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = root / "raw" / f"c{i % classes}" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(photo(rng, 48, 40)))
    options = PrepOptions(samples_per_shard=per_shard, shard_bytes=None, image=ImageOptions(max_side=64, min_side=8))
    prepare(str(root / "raw"), str(root / "shards"), options, workers=1, log=lambda *_: None)
    return root / "shards" / "manifest.json"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


def all_keys(manifest_path):
    manifest = json.loads(manifest_path.read_text())
    urls = [str(manifest_path.parent / s["name"]) for s in manifest["shards"]]
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def spec(manifest_path, batch_size=4, workers=0, train=True, **kw):
    transform = TransformSpec(image_size=32, train=train, randaugment_ops=2 if train else 0)
    return LoaderSpec(str(manifest_path), batch_size, transform, num_workers=workers, shuffle_buffer=8, **kw)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.parametrize("batch_size", [2, 4])
def test_exact_epoch_covers_every_sample_once(manifest, world_size, workers, batch_size):
    """53 samples in 8 uneven shards: no sample lost or repeated, equal batches per rank."""
    expected = all_keys(manifest)
    seen, batch_counts = [], set()
    for rank in range(world_size):
        loader_spec = spec(manifest, batch_size, workers)
        keys = epoch_keys(loader_spec, rank, world_size, epoch=0)
        seen += keys
        batch_counts.add(StreamingLoader(loader_spec, rank, world_size).batches_per_epoch)
    assert len(seen) == len(set(seen)) == len(expected)
    assert set(seen) == set(expected)
    assert len(batch_counts) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_what_keys_predicts(manifest, workers):
    world_size = 2
    counts = []
    for rank in range(world_size):
        loader = StreamingLoader(spec(manifest, 4, workers), rank, world_size)
        batches = list(loader.epoch(0))
        counts.append(len(batches))
        assert len(batches) == loader.batches_per_epoch
        assert [k for b in batches for k in b["keys"]] == epoch_keys(spec(manifest, 4, workers), rank, world_size, 0)
        for b in batches:
            assert b["images"].shape[1:] == (3, 32, 32) and b["images"].dtype == torch.uint8
            images, targets = loader.to_device(b, torch.device("cpu"), torch.bfloat16)
            assert images.shape == b["images"].shape and images.dtype == torch.bfloat16
            assert targets.shape == (len(b["keys"]), 3)
            torch.testing.assert_close(targets.sum(1), torch.ones(len(b["keys"])))  # soft targets
            assert b["corrupt"] == 0
    assert counts[0] == counts[1]


def test_order_depends_on_seed_and_epoch(manifest):
    first = epoch_keys(spec(manifest), 0, 2, epoch=0)
    assert epoch_keys(spec(manifest), 0, 2, epoch=0) == first
    assert epoch_keys(spec(manifest), 0, 2, epoch=1) != first
    assert epoch_keys(spec(manifest, seed=1), 0, 2, epoch=0) != first


@pytest.mark.parametrize("stop_after", [3, 4])
def test_resume_mid_epoch_is_exact(manifest, stop_after):
    """Batches before a stop plus batches after resuming = one uninterrupted epoch, bit for bit."""
    loader = StreamingLoader(spec(manifest, 4, workers=2), rank=1, world_size=2)
    straight = list(loader.epoch(2))
    before = []
    for batch in loader.epoch(2):
        before.append(batch)
        if len(before) == stop_after:
            break
    after = list(loader.epoch(2, start_batch=stop_after))
    resumed = before + after
    assert len(resumed) == len(straight)
    cpu = torch.device("cpu")
    for a, b in zip(resumed, straight):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["images"], b["images"]) and a["mix_seed"] == b["mix_seed"]
        assert all(map(torch.equal, loader.to_device(a, cpu), loader.to_device(b, cpu)))


def test_eval_loader_is_plain(manifest):
    loader = StreamingLoader(spec(manifest, 8, workers=0, train=False, shuffle=False), 0, 1)
    batches = list(loader.epoch(0))
    labels = torch.cat([loader.to_device(b, torch.device("cpu"))[1] for b in batches])
    assert labels.dtype == torch.int64 and len(labels) == 53
    again = list(loader.epoch(5))
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(batches, again))  # no randomness


def test_resampled_mode_epoch_length(manifest):
    world_size = 2
    keys = [epoch_keys(spec(manifest, 4, 2, mode="resampled", epoch_samples=40), r, world_size, 0) for r in range(2)]
    assert sum(map(len, keys)) == 40
    loaders = [StreamingLoader(spec(manifest, 4, 2, mode="resampled", epoch_samples=40), r, world_size) for r in range(2)]
    assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch


def _corrupt_one_sample(manifest_path, tmp_path):
    """Copy the dataset, garbling one sample's JPEG inside the second shard."""
    manifest = json.loads(manifest_path.read_text())
    out = tmp_path / "damaged"
    out.mkdir()
    victim = None
    for shard in manifest["shards"]:
        source = manifest_path.parent / shard["name"]
        with tarfile.open(source) as src, tarfile.open(out / shard["name"], "w") as dst:
            for member in src:
                data = src.extractfile(member).read()
                if victim is None and shard is manifest["shards"][1] and member.name.endswith(".jpg"):
                    victim = member.name.split(".")[0]
                    data = data[:20] + b"\x00" * 64
                    member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
    for shard in manifest["shards"]:  # the garbled member moved every later sample: no offsets
        del shard["offsets"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out / "manifest.json", victim


def test_corrupt_sample_skipped_and_counted(manifest, tmp_path, caplog):
    damaged, victim = _corrupt_one_sample(manifest, tmp_path)
    loader = StreamingLoader(spec(damaged, 4, workers=0, corrupt_limit=0.05), 0, 1)
    with caplog.at_level("WARNING"):
        batches = list(loader.epoch(0))
    keys = [k for b in batches for k in b["keys"]]
    assert victim not in keys and len(keys) == 52
    assert sum(b["corrupt"] for b in batches) == 1
    assert len(batches) == loader.batches_per_epoch
    assert any(victim in r.getMessage() and "train-000001.tar" in r.getMessage() for r in caplog.records)
    # Training batches keep their planned size: the victim's place goes to another view of the
    # first good sample of its batch, and the corrupt sample is still counted.
    full = list(StreamingLoader(spec(damaged, 4, workers=0, corrupt_limit=0.05, full_batches=True), 0, 1).epoch(0))
    planned = list(StreamingLoader(spec(manifest, 4, workers=0), 0, 1).epoch(0))
    assert [len(b["images"]) for b in full] == [len(b["labels"]) for b in full] == [len(b["keys"]) for b in planned]
    assert [b["keys"] for b in full] == [b["keys"] for b in batches] and sum(b["corrupt"] for b in full) == 1
    (hit,) = [b for b in full if b["corrupt"]]
    assert hit["labels"][-1] == hit["labels"][0] and len(hit["keys"]) == len(hit["labels"]) - 1

    strict = StreamingLoader(spec(damaged, 4, workers=0), 0, 1)  # default limit 0.1%: 1 of 53 is too many
    with pytest.raises(CorruptDataError, match=r"1 of 53 samples could not be decoded.*corrupt_limit=0.001"):
        list(strict.epoch(0))


def test_reads_from_s3(tmp_path, s3_endpoint, s3_bucket):
    import fsspec

    local_manifest = make_shards(tmp_path, count=20, per_shard=6)
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.put(str(local_manifest.parent), f"{s3_bucket}/shards", recursive=True)
    s3_spec = LoaderSpec(f"s3://{s3_bucket}/shards/manifest.json", 4, TransformSpec(image_size=32), num_workers=2,
                         storage_options={"endpoint_url": s3_endpoint})
    local_spec = LoaderSpec(str(local_manifest), 4, TransformSpec(image_size=32), num_workers=2)
    batches = list(StreamingLoader(s3_spec, 0, 1).epoch(0))
    assert [k for b in batches for k in b["keys"]] == epoch_keys(local_spec, 0, 1, 0)
    local = list(StreamingLoader(local_spec, 0, 1).epoch(0))
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(batches, local))


def test_keys_cli(manifest):
    result = subprocess.run(
        [sys.executable, "-m", "coatnet_scale.data", "keys", str(manifest), "--rank", "1", "--world-size", "3",
         "--num-workers", "2", "--epoch", "4", "--batch-size", "4", "--shuffle-buffer", "8"],
        capture_output=True, text=True, check=True,
    )
    assert result.stdout.splitlines() == epoch_keys(spec(manifest, 4, 2), 1, 3, 4)
    missing = subprocess.run([sys.executable, "-m", "coatnet_scale.data", "keys", "/nonexistent/manifest.json"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "manifest not found" in missing.stderr


@pytest.mark.parametrize("old, new", [((2, 2, 4), (3, 1, 5)), ((3, 0, 2), (1, 2, 4)), ((1, 2, 3), (2, 2, 3))])
@pytest.mark.parametrize("resize_at", [1, 3])
def test_a_resized_epoch_still_reads_every_sample_once(manifest, old, new, resize_at):
    """(ranks, workers, batch) before and after: the old group's ranks read their first batches
    through the real loader, the new group the rest of the epoch; together, each sample once."""
    from coatnet_scale.data.plan import Phase

    (n, k, b), (m, k2, b2) = old, new
    read = []
    for rank in range(n):
        batches = StreamingLoader(spec(manifest, b, k), rank, n).epoch(2)
        read += [key for _, batch in zip(range(resize_at), batches) for key in batch["keys"]]
    phases = (Phase(n, k, b, resize_at),)
    counts = set()
    for rank in range(m):
        loader = StreamingLoader(spec(manifest, b2, k2), rank, m)
        batches = list(loader.epoch(2, 0, phases))
        counts.add(len(batches))
        assert len(batches) == loader.batches_in(2, phases)
        read += [key for batch in batches for key in batch["keys"]]
    assert len(counts) == 1  # every rank of the new group steps the same number of times
    assert sorted(read) == sorted(all_keys(manifest))


def test_resume_inside_a_resized_epoch_is_exact(manifest):
    from coatnet_scale.data.plan import Phase

    phases = (Phase(2, 2, 4, 2),)
    loader = StreamingLoader(spec(manifest, 3, 2), 1, 3)
    straight = list(loader.epoch(0, 0, phases))
    resumed = list(loader.epoch(0, 2, phases))
    assert [b["keys"] for b in resumed] == [b["keys"] for b in straight[2:]]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(resumed, straight[2:]))


def test_keys_cli_across_a_resize(manifest):
    result = subprocess.run(
        [sys.executable, "-m", "coatnet_scale.data", "keys", str(manifest), "--world-size", "3", "--num-workers", "2",
         "--epoch", "1", "--batch-size", "2", "--shuffle-buffer", "8", "--resize-at", "2", "--new-world-size", "2"],
        capture_output=True, text=True, check=True,
    )
    lines = result.stdout.splitlines()
    groups = [line.split(" ")[0] for line in lines]
    keys = [line.split(" ")[1] for line in lines]
    assert sorted(keys) == sorted(all_keys(manifest))
    assert groups.count("3:0") == groups.count("3:1") == groups.count("3:2") == 2 * 2  # 2 batches of 2 each
    assert {"2:0", "2:1"} <= set(groups)


def test_a_resize_at_the_end_of_an_epoch_leaves_nothing_to_plan(manifest):
    """A group that read (nearly) the whole epoch: what it left may be fewer samples than the new
    group has slots; the loader says how many, so the engine can move to the next epoch."""
    from coatnet_scale.data.plan import Phase

    loader = StreamingLoader(spec(manifest, 4, 2), 0, 2)
    everything = Phase(2, 2, 4, loader.batches_per_epoch)
    assert StreamingLoader(spec(manifest, 4, 0), 0, 3).samples_left(0, (everything,)) == 0
    assert StreamingLoader(spec(manifest, 4, 0), 0, 3).samples_left(0, (Phase(2, 2, 4, 2),)) == 53 - 2 * 2 * 4


def test_a_rollback_then_a_resize_skips_the_samples_it_lists(manifest, tmp_path):
    """Issue 27, item 5, through the loader and the rollback record as the worker uses them: 2
    ranks (batch 2) checkpoint at step 2; a NaN at step 4 rolls back to it, skipping the batches of
    steps 3-4 and 1 more (train.spike_skip_batches). The next attempt (2 ranks) skips them and
    records which they were; then, before another checkpoint, the group resizes to 3 ranks (batch
    3), which resume from step 2 too. What the lineage trained on (2 ranks' batches 0-1, then the
    3 ranks' rest of the epoch) and what the record lists as skipped (the keys CLI's listing) are
    the epoch's samples, each once."""
    import math

    from coatnet_scale.config import Config
    from coatnet_scale.data.__main__ import skipped_keys
    from coatnet_scale.engine import collectives
    from coatnet_scale.engine.health import Health, Rollback, read_rollbacks
    from coatnet_scale.engine.monitor import Unmonitored

    run, config, checkpoint = str(tmp_path / "run"), Config(train={"spike_skip_batches": 1}), "step_000000002"

    def health(rank: int, records: list) -> Health:
        h = Health(config, run, {}, rank, 1, ["node"], torch.device("cpu"), checkpoint, 2, records)
        h.started(Unmonitored())
        return h

    def skip(loader: StreamingLoader, rank: int, records: list) -> tuple:
        """What an attempt of `loader`'s group does on resuming from the step-2 checkpoint."""
        place = loader.continue_from(0, 2, (), [2, 0, 2])  # the checkpoint: 2 ranks, 0 workers, batch 2
        group = {"manifest": str(manifest), "seed": 0, "shuffle_buffer": 8, "world_size": loader.world_size,
                 "num_workers": 0, "batch_size": loader.spec.batch_size}
        return health(rank, records).skip(loader, group, 1, *place)

    with collectives.audit(torch.device("cpu")), pytest.raises(Rollback):
        first = health(0, [])
        agreed = first.agree(4, math.nan, None, True, 0, 4, 0.1)
        first.roll_back(agreed.step, agreed.trouble)
    two = [StreamingLoader(spec(manifest, 2, 0), rank, 2) for rank in range(2)]
    seen = [key for loader in two for _, batch in zip(range(2), loader.epoch(0)) for key in batch["keys"]]
    records = read_rollbacks(run, {})  # each attempt reads them once, at its start
    assert [skip(loader, rank, records) for rank, loader in enumerate(two)] == [(0, 5, ())] * 2  # batches 2-4
    records = read_rollbacks(run, {})
    three = [StreamingLoader(spec(manifest, 3, 0), rank, 3) for rank in range(3)]
    for rank, loader in enumerate(three):
        seen += [key for batch in loader.epoch(*skip(loader, rank, records)) for key in batch["keys"]]
    skipped = [line.split(" ")[1] for line in skipped_keys(run)]
    assert len(skipped) == 2 * 3 * 2
    assert sorted(seen + skipped) == sorted(all_keys(manifest))
