"""Resuming at another world size (docs/elastic.md): DeepSpeed ZeRO-3 on CPU processes, through
the training loop's plain torch.distributed launcher (`--without-ray`, torchrun for two), then
on a Ray cluster of two nodes that loses one, reclaimed with a notice or dead without one. The
data side (each sample of a resized epoch read once) is test_data.py's; the batch arithmetic is
checked here."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coatnet_scale.batch import ElasticBatchError, batch_plan
from coatnet_scale.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def test_batch_kept_exactly_or_nearest_within_tolerance():
    train = TrainConfig(global_batch_size=4096, micro_batch_size=16, grad_accum_steps=1, elastic_batch_tolerance=0)
    full = batch_plan(train, 256, 256)
    assert (full.micro_batch_size, full.grad_accum_steps, full.lr_scale) == (16, 1, 1.0)
    half = batch_plan(train, 128, 256)
    assert (half.micro_batch_size, half.grad_accum_steps, half.global_batch_size) == (16, 2, 4096)
    with pytest.raises(ElasticBatchError, match="cannot be made by 255 workers .* worker counts that make it: 256, 128"):
        batch_plan(train, 255, 256)
    near = batch_plan(TrainConfig(global_batch_size=4096, micro_batch_size=16, elastic_batch_tolerance=0.01), 255, 256)
    assert near.global_batch_size == 4080 and near.lr_scale == pytest.approx(4080 / 4096)
    small = batch_plan(TrainConfig(global_batch_size=64, micro_batch_size=32), 8, 8)  # 8 per worker, in one pass
    assert (small.micro_batch_size, small.grad_accum_steps, small.global_batch_size) == (8, 1, 64)


def test_a_shrunk_group_keeps_its_micro_batch():
    """A lost node must not turn the micro-batch into 1 x 17 accumulation steps (a parameter
    gather per image, BatchNorm over one image): coatnet7.yaml at 248 and 240 workers, and every
    shipped config one 8-GPU node short, runs at least half the configured micro-batch; a
    pretraining config takes every size down to half its workers."""
    from coatnet_scale.batch import describe_sizes
    from coatnet_scale.config import load_config

    coatnet7 = load_config(REPO / "configs" / "coatnet7.yaml", []).train
    for workers in (248, 240):
        plan = batch_plan(coatnet7, workers, 256)
        assert plan.micro_batch_size >= 8 and abs(plan.lr_scale - 1) <= coatnet7.elastic_batch_tolerance
    assert (batch_plan(coatnet7, 240, 256).micro_batch_size, batch_plan(coatnet7, 240, 256).grad_accum_steps) == (9, 2)
    for path in sorted((REPO / "configs").glob("*.yaml")):
        config = load_config(path, [])
        t, workers = config.train, config.cluster.num_workers
        sizes = range(workers // 2, workers + 1) if "_ft" not in path.name else [max(1, workers - 8)]
        for size in sizes:
            plan = batch_plan(t, size, workers)
            assert plan.micro_batch_size >= (t.micro_batch_size + 1) // 2 or plan.grad_accum_steps == 1, (path.name, plan)
    lines = describe_sizes(coatnet7, 128, 256)
    assert lines[0] == "256..241 workers: micro-batch 16 x 1 = global 3856..4096" and len(lines) < 20
    strict = coatnet7.model_copy(update={"elastic_batch_tolerance": 0.0})
    assert describe_sizes(strict, 128, 256) == ["256 workers: micro-batch 16 x 1 = global 4096",
                                                "255..129 workers: cannot make the batch",
                                                "128 workers: micro-batch 16 x 2 = global 4096"]


def test_ema_partitions_recut_from_the_neighbouring_old_ranks_only():
    """ZeRO-3 cuts a tensor of n elements into ceil(n / world) per rank, the last padded. A rank
    of the new group gets exactly its cut of the whole tensor from the few old ranks
    `source_ranks` names."""
    import math
    import random

    import torch

    from coatnet_scale.engine.reshard import reshard_partitions, source_ranks

    def partitions(whole: torch.Tensor, world: int) -> list[torch.Tensor]:
        size = math.ceil(whole.numel() / world)
        padded = torch.cat([whole, torch.zeros(size * world - whole.numel())])
        return list(padded.split(size))

    rng = random.Random(0)
    for old, new in [(256, 255), (256, 8), (8, 256), (3, 2), (2, 3), (7, 7), (1, 4)]:
        numels = {f"p{i}": rng.choice([1, 5, 97, 1000, 65536 + rng.randrange(99)]) for i in range(6)}
        wholes = {name: torch.randn(n) for name, n in numels.items()}
        old_parts = [{name: partitions(w, old)[r] for name, w in wholes.items()} for r in range(old)]
        for rank in sorted({0, new // 2, new - 1}):
            sources = source_ranks(numels, old, rank, new)
            got = reshard_partitions({r: old_parts[r] for r in sources}, numels, old, rank, new)
            for name, whole in wholes.items():
                assert torch.equal(got[name], partitions(whole, new)[rank]), (old, new, rank, name)

    # CoAtNet-7's 789 parameters, 256 GPUs losing one node, halving or doubling: each new rank
    # reads at most a tenth of the old ranks' files (before: every one of them).
    from coatnet_scale.models import create_model

    with torch.device("meta"):
        numels = {n: p.numel() for n, p in create_model("coatnet_7", num_classes=21841, image_size=224).named_parameters()}
    for old, new in [(256, 248), (256, 128), (128, 256)]:
        assert max(len(source_ranks(numels, old, rank, new)) for rank in range(new)) <= old / 10, (old, new)


def pretrain(storage: Path, workers: int, *overrides: str, timeout: int = 600) -> str:
    launcher = [TORCHRUN, f"--nproc-per-node={workers}"] if workers > 1 else [sys.executable]
    command = [*launcher, "-m", "coatnet_scale.pretrain", "--config", str(TINY), "--without-ray",
               *(f"--set={o}" for o in (f"storage.url={storage}", f"cluster.num_workers={workers}", "train.total_steps=30",
                                        "train.log_every=1", "checkpoint.every_steps=10", "checkpoint.keep=5", "train.ema_decay=0.9",
                                        "data.val_manifest=null", "monitoring.enabled=false", *overrides))]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def history(run: Path) -> list[dict]:
    return json.loads(sorted(run.glob("metrics-step*.json"))[-1].read_text())["history"]


def weight_decays(checkpoint: Path) -> list[list[float]]:
    from coatnet_scale.engine.consolidate import _load

    return [[g["weight_decay"] for g in _load(f)["optimizer_state_dict"]["optimizer_state_dict"]["param_groups"]]
            for f in sorted(glob.glob(f"{checkpoint}/*optim_states.pt"))]


@pytest.mark.slow
@pytest.mark.parametrize("before, after, new_epoch_at", [
    # 1438 digits, global batch 64. 2 ranks x 32 read 10 batches each (640 samples); the other
    # 798 go to 1 rank at micro-batch 32 x 2 accumulation: 25 batches, so epoch 1 starts at step
    # 10 + 13 = 23. Resuming at batch 10 of a fresh 1-rank plan instead would give step 28.
    (2, 1, 23),
    # 1 rank read 20 batches of 32 (640); 798 left for 2 ranks: 13 batches each, epoch 1 at step 24.
    (1, 2, 24),
])
def test_resume_on_another_number_of_workers(demo_corpus, tmp_path, before, after, new_epoch_at):
    run = tmp_path / "tiny"
    first = pretrain(tmp_path, before, "train.stop_at_step=10")
    assert "checkpoint step 10 saved" in first
    # An unmarked conversion (a converter that died) is never used: converted again.
    leftover = run / "checkpoints" / "universal" / "step_000000010"
    leftover.mkdir(parents=True)
    (leftover / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    second = pretrain(tmp_path, after)
    assert f"written by {before} workers, now {after}" in second
    assert "converting" in second and (leftover / "COMPLETE.json").exists()
    marker = json.loads((leftover / "COMPLETE.json").read_text())
    assert marker["source_world_size"] == before and set(marker["sha256"]) == set(marker["files"])

    steps = history(run)
    assert steps[0]["step"] == 11 and steps[-1]["step"] == 30
    assert min(h["step"] for h in steps if h["epoch"] == 1) == new_epoch_at
    # Training goes on from where it was: no jump to chance (ln 10 = 2.30) after the resize.
    resumed_at = json.loads((run / "metrics-step000000010.json").read_text())["history"]
    last_before = resumed_at[-1]["loss"]
    assert max(h["loss"] for h in steps[:3]) < min(2.2, last_before + 0.5)
    assert steps[-1]["loss"] < resumed_at[0]["loss"]
    # DeepSpeed's universal loader copies group 0's hyperparameters into every group: the
    # no-weight-decay group (norms, biases, relative tables) is put back.
    final = run / "checkpoints" / "step_000000030"
    assert weight_decays(final) == [[0.05, 0.0]] * after
    written = json.loads((final / "COMPLETE.json").read_text())
    assert written["world_size"] == after and written["batch"]["global"] == 64
    # The EMA was resharded with the rest: it consolidates at the new size.
    from coatnet_scale.engine.consolidate import consolidate

    ema, _ = consolidate(str(run), weights="ema")
    assert ema["head.weight"].shape == (10, 256)


@pytest.mark.slow
def test_a_reclaimed_node_costs_no_step_and_the_group_goes_on_smaller(two_node_cluster, demo_corpus, s3_bucket):
    """Two nodes, one worker each (2 CPUs per worker, 2 per node), elastic down to one, no
    periodic checkpoint due. After step 40 the second node's `ray start --block` gets SIGTERM
    (what KubeRay's pod deletion sends): Ray drains the node (a 20 s deadline here), the loop
    hears of it at its next poll, every rank saves, and training goes on until the node goes.
    Ray restarts the group with the one worker that fits, which resumes that checkpoint (steps
    lost: 0) and finishes in the accuracy band of an uninterrupted run. From step 41 rank 0 is
    slowed (a fault of this attempt only), so the 80 steps outlast the drain as a long run would."""
    import s3fs

    cluster = two_node_cluster
    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    run = f"{s3_bucket}/runs/reclaimed"
    overrides = [f"storage.url=s3://{s3_bucket}/runs", "run_name=reclaimed", "cluster.num_workers=2",
                 "cluster.min_workers=1", "cluster.cpus_per_worker=2", "train.total_steps=80", "train.log_every=10",
                 "checkpoint.every_steps=1000", "checkpoint.preemption_poll_steps=5",
                 f"data.train_manifest={demo_corpus}/train/manifest.json",
                 f"data.val_manifest={demo_corpus}/val/manifest.json"]
    job = cluster.client.submit_job(
        entrypoint=" ".join(["env", "COATNET_SCALE_FAULT=slow@step=41,rank=0,seconds=0.4",  # the driver hands it on
                             sys.executable, "-m", "coatnet_scale.pretrain", "--config", str(TINY),
                             *(f"--set={o}" for o in overrides)]),
    )
    deadline = time.monotonic() + 900
    while "step 40/80" not in cluster.client.get_job_logs(job):
        assert not cluster.client.get_job_status(job).is_terminal() and time.monotonic() < deadline, \
            cluster.client.get_job_logs(job)[-4000:]
        time.sleep(0.5)
    cluster.nodes[0].send_signal(signal.SIGTERM)  # the second node's `ray start --block`
    while not cluster.client.get_job_status(job).is_terminal():
        assert time.monotonic() < deadline
        time.sleep(2)
    logs = cluster.client.get_job_logs(job)
    assert str(cluster.client.get_job_status(job)) == "SUCCEEDED", logs[-4000:]
    said = "\n".join(line for line in logs.splitlines() if "preemption" in line or "resumed from" in line)
    notice = re.search(r"preemption: node\(s\) \S+ \(ranks \[(\d)\]\) reclaimed in ([\d.]+) s: saving a checkpoint at "
                       r"step (\d+)", logs)
    assert notice, said[-4000:]
    saved_at = int(notice.group(3))
    assert saved_at >= 40 and f"checkpoint step {saved_at} saved to s3://{run}/checkpoints" in logs, said[-4000:]
    # Steps lost: the notice's step less the step the smaller group resumed at.
    resumed = re.search(r"resumed from \S+/step_\d+: step (\d+), .*written by 2 workers, now 1, saved on a preemption "
                        r"notice", logs)
    assert resumed and saved_at - int(resumed.group(1)) == 0, said[-4000:]
    marker = json.loads(fs.cat_file(f"{run}/checkpoints/step_{saved_at:09d}/COMPLETE.json"))
    assert marker["preemption"]["ranks"] == [int(notice.group(1))] and marker["world_size"] == 2
    final = json.loads(fs.cat_file(sorted(fs.glob(f"{run}/metrics-step*.json"))[-1]))["final"]
    assert final["step"] == 80
    # Ten classes (chance 10%); an uninterrupted run of these 80 steps scores 90%.
    assert final["val_top1"] > 0.85
    # The module's next test finds two nodes again: the drained one gone (its `ray start` ended,
    # Ray lists it dead), then a new one.
    cluster.nodes[0].wait(timeout=60)
    deadline = time.monotonic() + 60
    while len(cluster.alive_nodes()) > 1:
        assert time.monotonic() < deadline, "Ray still lists the drained node alive"
        time.sleep(0.5)
    cluster.add_node(num_cpus=2, node_ip="127.0.0.3")


@pytest.mark.slow
def test_a_dead_node_shrinks_the_group_and_training_goes_on(two_node_cluster, demo_corpus, s3_bucket):
    """Two nodes, one worker each (2 CPUs per worker, 2 per node), elastic down to one. The
    second node's raylet is SIGKILLed once the step-20 checkpoint is complete (a node that dies
    with no notice): Ray restarts the group with the one worker that fits, which resumes the
    newest checkpoint the two workers completed and finishes in the accuracy band of an
    uninterrupted run."""
    import s3fs

    cluster = two_node_cluster
    assert len(cluster.alive_nodes()) == 2  # an elastic group started on fewer would lose no worker below
    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    run = f"{s3_bucket}/runs/dead"
    overrides = [f"storage.url=s3://{s3_bucket}/runs", "run_name=dead", "cluster.num_workers=2", "cluster.min_workers=1",
                 "cluster.cpus_per_worker=2", "train.total_steps=80", "checkpoint.every_steps=20", "checkpoint.keep=5",
                 f"data.train_manifest={demo_corpus}/train/manifest.json",
                 f"data.val_manifest={demo_corpus}/val/manifest.json"]
    job = cluster.client.submit_job(entrypoint=" ".join([sys.executable, "-m", "coatnet_scale.pretrain", "--config",
                                                         str(TINY), *(f"--set={o}" for o in overrides)]))
    deadline = time.monotonic() + 900
    while not fs.exists(f"{run}/checkpoints/step_000000020/COMPLETE.json"):
        assert not cluster.client.get_job_status(job).is_terminal() and time.monotonic() < deadline, \
            cluster.client.get_job_logs(job)[-4000:]
        time.sleep(0.5)
    first = json.loads(fs.cat_file(f"{run}/checkpoints/step_000000020/COMPLETE.json"))
    assert first["world_size"] == 2, "the group started without the second node's worker"
    raylet = subprocess.run(["pgrep", "-f", f"raylet.*{cluster.temp_dirs[-1]}"], capture_output=True, text=True).stdout.split()
    assert raylet, "the second node's raylet was not found"
    for pid in raylet:
        os.kill(int(pid), signal.SIGKILL)
    while not cluster.client.get_job_status(job).is_terminal():
        assert time.monotonic() < deadline
        time.sleep(2)
    logs = cluster.client.get_job_logs(job)
    assert str(cluster.client.get_job_status(job)) == "SUCCEEDED", logs[-4000:]
    # The smaller group resumed from the newest checkpoint the two workers completed (step 20,
    # or 40 when that one was done before the group noticed the loss), and wrote the rest alone.
    markers = {int(p.rsplit("_", 1)[-1].split("/")[0]): json.loads(fs.cat_file(p))["world_size"]
               for p in fs.glob(f"{run}/checkpoints/step_*/COMPLETE.json")}
    newest_of_two = max(step for step, world in markers.items() if world == 2)
    assert newest_of_two >= 20 and markers[80] == 1, markers
    resumed = re.findall(r"resumed from \S+/step_(\d+): step (\d+), .*written by (\d) workers, now (\d)", logs)
    assert resumed == [(f"{newest_of_two:09d}", str(newest_of_two), "2", "1")], logs[-4000:]
    final = json.loads(fs.cat_file(sorted(fs.glob(f"{run}/metrics-step*.json"))[-1]))["final"]
    assert final["step"] == 80
    # Ten classes (chance 10%); an uninterrupted run of these 80 steps scores 90%.
    assert final["val_top1"] > 0.85


def test_preflight_prints_what_each_group_size_runs(capsys):
    from coatnet_scale.config import load_config
    from coatnet_scale.pretrain import warn_elastic_sizes

    warn_elastic_sizes(load_config(REPO / "configs" / "coatnet7.yaml", ["cluster.min_workers=232"]))
    out, err = capsys.readouterr()
    assert out.strip() == ("cluster: an elastic group runs, by size: 256..241 workers: micro-batch 16 x 1 = global "
                           "3856..4096; 240..232 workers: micro-batch 9 x 2 = global 4176..4320") and not err
    warn_elastic_sizes(load_config(REPO / "configs" / "coatnet7.yaml", ["cluster.min_workers=250",
                                                                        "train.elastic_batch_tolerance=0"]))
    out, err = capsys.readouterr()
    assert "255..250 workers: cannot make the batch" in out
    assert "an elastic group of 255..250 workers cannot make train.global_batch_size=4096" in err


def test_a_notice_is_acted_on_once_per_node_and_a_short_deadline_is_named():
    """The loop's side of Ray's notices (engine/interrupt.py), with Ray's own PreemptionInfo: asked
    only every poll_steps steps, one save per reclaimed node, and a warning when the last save
    took longer than the deadline leaves."""
    from ray.train import PreemptionInfo

    from coatnet_scale.engine.interrupt import Notices, drain_line

    asked, now_ms = [], int(time.time() * 1000)
    answers = {10: None, 20: PreemptionInfo(now_ms + 30_000, {"node-b": [1]}),
               30: PreemptionInfo(now_ms + 30_000, {"node-b": [1]}),
               40: PreemptionInfo(now_ms + 5_000, {"node-b": [1], "node-c": [2, 3]})}
    at = [0]  # the loop's step
    notices = Notices(lambda: asked.append(at[0]) or answers[at[0]], poll_steps=10)
    found = {}
    for step in range(1, 41):
        at[0] = step
        found[step] = notices.new(step)
    assert asked == [10, 20, 30, 40] and [s for s, n in found.items() if n] == [20, 40]
    assert found[40] == {"notice_step": 40, "deadline_ms": now_ms + 5_000, "ranks": [1, 2, 3], "nodes": ["node-b", "node-c"]}
    line = drain_line(notices.situation(found[20]), {"preemption": found[20]}, 20)  # the loop's line
    assert re.fullmatch(r"preemption: node\(s\) node-b \(ranks \[1\]\) reclaimed in (29|30)\.\d s: saving a checkpoint at step "
                        r"20, then training on until the node goes", line), line
    notices.last_save_s = 12.0
    assert "warning: the last save took 12.0 s, longer than that" in notices.situation(found[40])
    assert "warning" not in notices.situation(found[20])
    assert Notices(None, 10).new(10) is None  # without Ray nothing is asked
