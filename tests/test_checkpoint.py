"""Checkpoint bookkeeping that needs no training run: what counts as complete, what is kept."""
import json
from pathlib import Path

import pytest

from coatnet_scale.engine.checkpoint import MARKER, Checkpoints, tag_for


def make_checkpoint(root, step, complete=True):
    folder = root / tag_for(step)
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    if complete:
        (folder / MARKER).write_text(json.dumps({"step": step, "world_size": 2, "files": []}))


def test_interrupted_checkpoint_is_never_chosen(tmp_path):
    make_checkpoint(tmp_path, 100)
    make_checkpoint(tmp_path, 200)
    make_checkpoint(tmp_path, 300, complete=False)  # killed before its marker
    checkpoints = Checkpoints(str(tmp_path), {}, keep=3, rank=0, world_size=2)
    assert checkpoints.complete() == [(100, tag_for(100)), (200, tag_for(200))]
    assert checkpoints.latest() == tag_for(200)


def test_nothing_to_resume_from(tmp_path):
    assert Checkpoints(str(tmp_path / "new-run"), {}, keep=1, rank=0, world_size=1).latest() is None


def test_prune_keeps_newest_complete(tmp_path):
    for step in (100, 200, 300):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 150, complete=False)  # stale leftover of a crash
    make_checkpoint(tmp_path, 400, complete=False)  # a save that may still be in progress
    Checkpoints(str(tmp_path), {}, keep=2, rank=0, world_size=2)._prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(200), tag_for(300), tag_for(400)]


S3_ROUND_TRIP = """
import os, sys, torch, json
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", DS_ACCELERATOR="cpu")
import deepspeed
from coatnet_scale.engine.checkpoint import Checkpoints
from coatnet_scale.models import create_model

deepspeed.init_distributed(dist_backend="gloo", verbose=False)
config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
          "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True}

def engine(seed):
    torch.manual_seed(seed)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = create_model("coatnet_pico", num_classes=10, image_size=32)
    e, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    return e

def flat(e):
    return torch.cat([p.ds_tensor.flatten() for p in e.module.parameters()])

url = sys.argv[1]
checkpoints = Checkpoints(url, {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}, keep=1, rank=0, world_size=1)
first = engine(0)
loss = first(torch.randn(2, 3, 32, 32)).sum()
first.backward(loss); first.step()
saved = checkpoints.save(first, 7, {"step": 7, "rng": {"torch": torch.get_rng_state()}})
assert not saved.complete  # on an object store the upload goes on in the background
assert checkpoints.wait() is saved and saved.complete
second = engine(1)
assert not torch.equal(flat(first), flat(second))
tag, marker = checkpoints.choose()
assert tag == "step_000000007" and set(marker["sha256"]) == set(marker["files"]) - {"COMPLETE.json"}
state = checkpoints.load(second, tag, marker)
assert state["step"] == 7
assert torch.equal(flat(first), flat(second))

# One byte of a rank's optimizer file changed in storage: refused, by name, before DeepSpeed
# unpickles it.
from coatnet_scale.engine.checkpoint import CheckpointTampered
victim = next(n for n in marker["files"] if n.startswith("zero_pp_rank_0_"))
path = f"{checkpoints.root}/{tag}/{victim}"
data = bytearray(checkpoints.fs.cat_file(path))
data[len(data) // 2] ^= 1
checkpoints.fs.pipe_file(path, bytes(data))
try:
    checkpoints.load(engine(2), tag, marker)
    raise SystemExit("a tampered file was loaded")
except CheckpointTampered as e:
    assert f"{tag}/{victim}: sha256" in str(e) and "refusing to load it" in str(e), e
print("ok")
"""


@pytest.mark.slow
def test_checkpoint_round_trip_through_s3(s3_endpoint, s3_bucket, unused_tcp_port):
    """A real DeepSpeed ZeRO-3 engine saves to S3 through local staging, with the marker last,
    and a differently initialised engine loads it back to identical weights; a file changed
    afterwards is refused by name."""
    import subprocess
    import sys

    import fsspec

    url = f"s3://{s3_bucket}/run/checkpoints"
    result = subprocess.run([sys.executable, "-c", S3_ROUND_TRIP, url, str(unused_tcp_port)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint, skip_instance_cache=True)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/run/checkpoints/step_000000007"))
    assert names[0] == MARKER and "trainer_state_rank0.pt" in names
    assert any(n.startswith("zero_pp_rank_0_") for n in names)


def test_damaged_marker_is_not_complete(tmp_path):
    make_checkpoint(tmp_path, 100)
    make_checkpoint(tmp_path, 200, complete=False)
    (tmp_path / tag_for(200) / MARKER).write_text("")  # a crash while the marker was written
    assert Checkpoints(str(tmp_path), {}, keep=2, rank=0, world_size=2).latest() == tag_for(100)


def _await_conversion(rank: int, folder: str, port: int, out: str, fail: bool) -> None:
    """One rank of two in a gloo group whose collectives time out after 2 s; rank 0's
    conversion takes 4 s (DeepSpeed's converter stood in for by a sleep: what is under test
    is how the other rank waits for it)."""
    import os
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from coatnet_scale.storage import write_atomic

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=2))
    checkpoints = Checkpoints(folder, {}, keep=2, rank=rank, world_size=2)

    def slow_convert(tag, marker):
        time.sleep(4)
        if fail:
            raise ValueError(f"{tag}: no optimizer states")
        universal = {"step": marker["step"], "source_world_size": marker["world_size"], "files": []}
        write_atomic(checkpoints.fs, f"{checkpoints.root}/universal/{tag}/{MARKER}", json.dumps(universal).encode())
        return universal

    checkpoints.convert = slow_convert
    started = time.monotonic()
    try:
        outcome = {"marker": checkpoints._universal(tag_for(4), {"step": 4, "world_size": 1}, poll_s=0.2)}
    except RuntimeError as e:
        outcome = {"error": str(e)}
    outcome["waited"] = time.monotonic() - started
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump(outcome, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("fail", [False, True])
def test_ranks_wait_for_a_conversion_longer_than_the_group_timeout(tmp_path, unused_tcp_port, fail):
    """On a resize rank 0 alone converts (about 50 min single-threaded for CoAtNet-7, past the
    30-min group timeout); the others wait in storage for its marker or its error, so a long
    conversion neither times out their group nor leaves them waiting on a failed one."""
    import torch.multiprocessing as mp

    make_checkpoint(tmp_path / "checkpoints", 4)
    mp.spawn(_await_conversion, args=(str(tmp_path / "checkpoints"), unused_tcp_port, str(tmp_path), fail), nprocs=2)
    waiting = json.loads((tmp_path / "1.json").read_text())
    assert waiting["waited"] > 3  # past the 2 s timeout, still waiting
    if fail:
        assert waiting["error"] == (f"cannot convert {tmp_path / 'checkpoints'}/step_000000004 for 2 workers: "
                                    "ValueError: step_000000004: no optimizer states")
        assert json.loads((tmp_path / "0.json").read_text())["error"] == waiting["error"]
    else:
        assert waiting["marker"] == {"step": 4, "source_world_size": 1, "files": []}


class StagingEngine:
    """Stands in for DeepSpeed's engine in the bookkeeping test: writes this rank's partition
    file where `save_checkpoint` is told, as ZeRO-3 does (every rank its own file)."""

    def __init__(self, rank: int):
        self.rank = rank

    def save_checkpoint(self, save_dir, tag, save_latest):
        import os

        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"), "wb") as f:
            f.write(b"x" * 1000)


def _background_saves(rank: int, folder: str, port: int, out: str) -> None:
    """One rank of two: rank 1's upload of step 2 pauses 3 s (the fault hook); the loop's
    per-step all-reduce stands in for health.agree's."""
    import os
    import time

    import torch
    import torch.distributed as dist

    from coatnet_scale.engine.faults import Faults

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), COATNET_SCALE_FAULT="slowupload@step=2,rank=1,seconds=3")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    checkpoints = Checkpoints(f"{folder}/checkpoints", {}, keep=1, rank=rank, world_size=2, async_upload=True,
                              faults=Faults(f"{folder}", {}, rank))
    completed, seen = [], []
    checkpoints.on_complete = lambda saved: completed.append(saved.step)
    engine = StagingEngine(rank)
    first = checkpoints.save(engine, 2, {"step": 2})
    staged = {"complete": first.complete, "blocked": first.blocked}
    while True:  # step boundaries
        mine = checkpoints.upload_state() == "stored"
        tensor = torch.tensor([float(mine)], dtype=torch.float64)
        dist.all_reduce(tensor)
        done = int(tensor.item())
        seen.append([mine, done, (Path(folder) / "checkpoints" / tag_for(2) / MARKER).exists()])
        if done == 2:
            checkpoints.commit()
            break
        time.sleep(0.1)
    checkpoints.save(engine, 4, {"step": 4})
    checkpoints.save(engine, 6, {"step": 6})  # waits for step 4's upload and marks it first
    after_six = sorted(p.name for p in (Path(folder) / "checkpoints").iterdir())
    in_flight = checkpoints.pending.step
    checkpoints.wait()
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump({"staged": staged, "seen": seen, "completed": completed, "after_six": after_six,
                   "in_flight": in_flight}, f)
    dist.destroy_process_group()


def test_background_upload_marks_only_after_every_rank_and_keeps_one_in_flight(tmp_path, unused_tcp_port):
    """Two ranks save with background upload: the save returns before anything is stored; the
    marker appears only once both ranks' uploads are done (rank 1's is held 3 s), learned at a
    step boundary; a save while one is in flight first completes it (one in flight), and
    pruning (keep 1) never removes the one uploading."""
    import torch.multiprocessing as mp

    mp.spawn(_background_saves, args=(str(tmp_path), unused_tcp_port, str(tmp_path)), nprocs=2)
    zero, one = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert not zero["staged"]["complete"] and zero["staged"]["blocked"] < 3
    # Rank 0 stored its part long before rank 1, and no marker existed while the group said 1 of 2.
    waiting = [s for s in zero["seen"] if s[0] and s[1] == 1]
    assert len(waiting) >= 5 and not any(marked for *_, marked in waiting)
    assert zero["seen"][-1][1] == 2 and not one["seen"][0][0]
    # After the save at 6: step 4 marked (and 2 pruned), 6 staged but not marked, kept.
    assert zero["after_six"] == [tag_for(4), tag_for(6)]
    assert zero["in_flight"] == one["in_flight"] == 6
    assert zero["completed"] == one["completed"] == [2, 4, 6]
    marker = json.loads((tmp_path / "checkpoints" / tag_for(6) / MARKER).read_text())
    assert marker["files"] == sorted([f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)] + [
        f"trainer_state_rank{r}.pt" for r in (0, 1)])


def _failed_saves(rank: int, url: str, port: int, out: str, endpoint: str) -> None:
    """One rank of two saving to S3 in the background; rank 1's upload of step 2 fails for real
    (the failupload fault: the store refuses a write). Each step boundary the ranks all-reduce
    their upload states, as health.agree does, and act on the group's verdict."""
    import os

    import torch
    import torch.distributed as dist

    from coatnet_scale.engine.faults import Faults
    from coatnet_scale.engine.health import upload_outcome

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), COATNET_SCALE_FAULT="failupload@step=2,rank=1")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    options = {"endpoint_url": endpoint}
    checkpoints = Checkpoints(f"{url}/checkpoints", options, keep=2, rank=rank, world_size=2, async_upload=True,
                              faults=Faults(url, options, rank))
    failed, completed = [], []
    checkpoints.on_failed = lambda saved, errors: failed.append([saved.step, errors])
    checkpoints.on_complete = lambda saved: completed.append(saved.step)
    verdicts = []
    for step in (2, 4):
        checkpoints.save(StagingEngine(rank), step, {"step": step})
        while checkpoints.pending is not None:  # step boundaries
            state = checkpoints.upload_state()
            counts = torch.tensor([state == "stored", state == "failed"], dtype=torch.float64)
            dist.all_reduce(counts)
            verdict = upload_outcome(int(counts[0]), int(counts[1]), state != "none", 2)
            verdicts.append([step, verdict])
            if verdict == "stored":
                checkpoints.commit()
            elif verdict == "failed":
                checkpoints.drop()
                after_drop = checkpoints.fs.exists(f"{checkpoints.root}/{tag_for(2)}")
    checkpoints.wait()
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump({"failed": failed, "completed": completed, "verdicts": verdicts, "after_drop": after_drop,
                   "in_a_row": checkpoints.failed_in_a_row, "failed_saves": checkpoints.failed_saves}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_one_ranks_upload_error_drops_the_save_on_every_rank(s3_endpoint, s3_bucket, tmp_path, unused_tcp_port):
    """Rank 1's upload of step 2 fails against S3: no rank hangs or raises; at the same step
    boundary both drop the save (its files removed, no marker), rank 1 and its error named;
    the save at step 4 completes and resets the count of failed saves in a row."""
    import torch.multiprocessing as mp

    import s3fs

    url = f"s3://{s3_bucket}/run"
    mp.spawn(_failed_saves, args=(url, unused_tcp_port, str(tmp_path), s3_endpoint), nprocs=2)
    zero, one = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert zero["verdicts"] == one["verdicts"] and ([2, "failed"] in zero["verdicts"])
    ((step, errors),) = zero["failed"]
    assert step == 2 and one["failed"] == zero["failed"] and [r for r, _ in errors] == [1]
    assert errors[0][1] == "FileNotFoundError: The specified bucket does not exist"  # S3's own answer
    assert zero["after_drop"] is False and zero["completed"] == one["completed"] == [4]
    assert zero["in_a_row"] == 0 and zero["failed_saves"] == 1
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    assert not fs.exists(f"{s3_bucket}/run/checkpoints/{tag_for(2)}")
    assert fs.exists(f"{s3_bucket}/run/checkpoints/{tag_for(4)}/{MARKER}")


def test_a_rollback_waits_for_a_stalled_upload_only_so_long(s3_endpoint, s3_bucket, monkeypatch):
    """The rollback's discard of a save whose upload to S3 stalls (slowupload: 2 s after its
    first file) returns after its bound, and the upload stores no further file."""
    import time

    from coatnet_scale.engine.faults import Faults

    monkeypatch.setenv("COATNET_SCALE_FAULT", "slowupload@step=2,seconds=2")
    url, options = f"s3://{s3_bucket}/run", {"endpoint_url": s3_endpoint}
    checkpoints = Checkpoints(f"{url}/checkpoints", options, keep=1, rank=0, world_size=1, async_upload=True,
                              faults=Faults(url, options, 0))
    checkpoints.save(StagingEngine(0), 2, {"step": 2})
    while not checkpoints.fs.exists(f"{url}/health/faults/slowupload-step2-rank0.json"):
        time.sleep(0.1)  # the upload is in its pause after the first file
    started = time.monotonic()
    checkpoints.discard(timeout_s=0.5)
    assert time.monotonic() - started < 2 and checkpoints.pending is None
    time.sleep(2.5)  # the pause ends: nothing more is stored
    stored = [p.rsplit("/", 1)[-1] for p in checkpoints.fs.ls(f"{checkpoints.root}/{tag_for(2)}", refresh=True)]
    assert stored == ["trainer_state_rank0.pt"]  # the first of its two files only


def test_staging_left_by_a_dead_process_is_removed(tmp_path):
    import subprocess
    import sys

    from coatnet_scale.engine.checkpoint import clean_stale_staging

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"coatnet_scale_ckpt_rank0_pid{gone.stdout.strip()}_x1"
    live = tmp_path / f"coatnet_scale_ckpt_rank1_pid{__import__('os').getpid()}_x2"
    for folder in (dead, live):
        (folder / "step_000000002").mkdir(parents=True)
        (folder / "step_000000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (tmp_path / "unrelated").mkdir()
    assert clean_stale_staging(str(tmp_path)) == [dead.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "unrelated"])
    # What the checkpoints stage names itself by: this process's id.
    assert Checkpoints(str(tmp_path / "s"), {}, keep=1, rank=3, world_size=4)._staging_prefix() == \
        f"coatnet_scale_ckpt_rank3_pid{__import__('os').getpid()}_"


def test_pruning_removes_the_marker_before_the_files(tmp_path, monkeypatch):
    """A removal that stops half-way (here: the process dies in it) must leave an incomplete
    checkpoint, never a complete-looking one with files missing."""
    make_checkpoint(tmp_path, 100)
    make_checkpoint(tmp_path, 200)
    checkpoints = Checkpoints(str(tmp_path), {}, keep=1, rank=0, world_size=1)
    removed = []
    real_rm = checkpoints.fs.rm

    class Died(BaseException):
        pass

    def rm_then_die(path, recursive=False, **kwargs):
        removed.append(path.rsplit("/", 1)[-1])
        real_rm(path, recursive=recursive, **kwargs)
        raise Died  # the first removal done, the process gone

    monkeypatch.setattr(checkpoints.fs, "rm", rm_then_die)  # fsspec shares the instance: undone after the test
    with pytest.raises(Died):
        checkpoints._prune()
    assert removed == [MARKER] and checkpoints.complete() == [(200, tag_for(200))]


@pytest.mark.slow
def test_a_worker_killed_while_uploading_leaves_no_marker(demo_corpus, s3_endpoint, s3_bucket):
    """One worker saving to S3 in the background; its upload of step 4 pauses after the first
    file (the slowupload fault) while the loop trains on. SIGKILL then: step 4 has a file but no
    marker, and the same command resumes from step 2 and finishes."""
    import os
    import signal
    import subprocess
    import sys

    import s3fs

    repo = Path(__file__).resolve().parent.parent
    runs = f"s3://{s3_bucket}/runs"
    overrides = [f"storage.url={runs}", "run_name=killed", f"data.train_manifest={demo_corpus}/train/manifest.json",
                 "data.val_manifest=null", "data.num_workers=0", "cluster.num_workers=1", "train.global_batch_size=32",
                 "train.total_steps=6", "train.warmup_steps=1", "train.log_every=1", "checkpoint.every_steps=2",
                 "monitoring.enabled=false"]
    command = [sys.executable, "-m", "coatnet_scale.pretrain", "--config", str(repo / "configs" / "tiny.yaml"),
               "--without-ray", *(f"--set={o}" for o in overrides)]
    env = {**os.environ, "COATNET_SCALE_FAULT": "slowupload@step=4,seconds=120"}
    worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=repo)
    seen = []
    try:
        for line in worker.stdout:  # the upload's pause began, and the loop trained step 5 meanwhile
            seen.append(line)
            if any(s.startswith("step 5/6") for s in seen) and any("slowupload on rank 0 at step 4" in s for s in seen):
                break
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.communicate(timeout=60)
    output = "".join(seen)
    assert "slowupload on rank 0 at step 4" in output and "step 5/6" in output, output[-3000:]
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    folder = f"{s3_bucket}/runs/killed/checkpoints"
    assert fs.exists(f"{folder}/{tag_for(2)}/{MARKER}")
    uploaded = [p.rsplit("/", 1)[1] for p in fs.ls(f"{folder}/{tag_for(4)}")]
    assert uploaded and MARKER not in uploaded  # killed mid-upload: some files, no marker

    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=repo, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resumed from {runs}/killed/checkpoints/{tag_for(2)}: step 2" in result.stdout
    assert fs.exists(f"{folder}/{tag_for(6)}/{MARKER}")
