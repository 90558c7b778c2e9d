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
        mine = checkpoints.uploaded()
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
