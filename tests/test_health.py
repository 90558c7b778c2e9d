"""Run health (engine/health.py, engine/watchdog.py, engine/faults.py): the verdicts on one rank,
then real runs: a diverging run (lr 50) stopped with exit 78 and staying stopped, a frozen
rank's peer (under torchrun) dumping its stacks, all ending, and the run resuming; two ranks of a
node uploading a killed attempt's dumps to S3. test_finetune.py's Ray run has the rest: a NaN rolled back
with its skipped samples listed by the keys CLI, a frozen worker caught and resumed, a slow rank
named, and the run in its accuracy band."""
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coatnet_scale.config import Config, StorageConfig
from coatnet_scale.engine import collectives
from coatnet_scale.engine.faults import Faults, parse
from coatnet_scale.engine.health import Health, Rollback, read_rollbacks
from coatnet_scale.engine.monitor import Unmonitored
from coatnet_scale.storage import storage_options, url_to_fs

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def health(tmp_path, records=(), **train) -> Health:
    config = Config(train={"max_rollbacks": 1, **train})
    h = Health(config, str(tmp_path), {}, 0, 1, ["node-a"], torch.device("cpu"), None, 0, list(records))
    h.started(Unmonitored())
    return h


def test_skipped_steps_roll_back_then_the_run_stops(tmp_path):
    with collectives.audit(torch.device("cpu")):  # one rank: the all-reduce is the identity
        h = health(tmp_path)
        # A stop signal and the upload's outcome ride on the same reduction.
        agreed = h.agree(1, 2.0, 1.0, True, 0, 64, 0.1, upload="failed", signalled=True)
        assert (agreed.loss, agreed.signalled, agreed.upload, agreed.trouble) == (2.0, 1, "failed", None)
        assert h.agree(1, 2.0, 1.0, True, 0, 64, 0.1, upload="pending").upload == "pending"
        assert h.agree(1, 2.0, 1.0, True, 0, 64, 0.1, upload="stored").upload == "stored"
        agreed = h.agree(2, 2.0, math.inf, False, 0, 64, 0.1)
        assert agreed.trouble is None and not h.healthy  # skipped: no checkpoint now
        assert h.agree(3, 2.0, math.inf, False, 0, 64, 0.1).trouble is None
        trouble = h.agree(4, 2.0, math.inf, False, 0, 64, 0.1).trouble
        assert trouble == "3 steps in a row skipped (non-finite gradients)"
        with pytest.raises(Rollback, match="3 steps in a row skipped"):
            h.roll_back(4, trouble)
        (record,) = read_rollbacks(str(tmp_path), {})
        assert (record["step"], record["first_bad_step"], record["checkpoint"], record["skip_steps"]) == (4, 2, None, 4)
        # The next attempt starts from the same (no) checkpoint: max_rollbacks 1 is spent.
        h = health(tmp_path, read_rollbacks(str(tmp_path), {}))
        stop = h.roll_back(5, h.agree(5, math.nan, None, True, 0, 64, 0.1).trouble)
        assert stop.startswith("step 5: the loss is not finite on 1 rank(s); after 1 rollback(s) to the last good "
                               "checkpoint, none (the run has no checkpoint yet)")


def test_a_loss_spike_rolls_back_after_64_steps(tmp_path):
    with collectives.audit(torch.device("cpu")):
        h = health(tmp_path, spike_window=64)
        for step in range(1, 64):
            h.agree(step, 2.0 + 0.01 * (step % 3), 1.0, True, 0, 64, 0.1)
        assert h.agree(64, 9.0, 1.0, True, 0, 64, 0.1).trouble is None  # too few steps to judge yet: taken as a step
        h = health(tmp_path, spike_window=64)
        for step in range(1, 65):
            h.agree(step, 2.0 + 0.01 * (step % 3), 1.0, True, 0, 64, 0.1)
        assert h.agree(65, 9.0, 1.0, True, 0, 64, 0.1).trouble.startswith("loss spike: 9 above the mean 2.01")


def test_fault_specs(tmp_path, monkeypatch):
    assert parse("slow@step=5,rank=1,seconds=0.5") == {"kind": "slow", "step": 5, "rank": 1, "seconds": 0.5}
    with pytest.raises(ValueError, match="COATNET_SCALE_FAULT='boom@step=1': expected nan@step=N"):
        parse("boom@step=1")
    monkeypatch.setenv("COATNET_SCALE_FAULT", "nan@step=3;slow@step=2,rank=0,seconds=0.01")
    faults = Faults(str(tmp_path), {}, 0)
    assert [faults.nan(s) for s in (2, 3, 3)] == [False, True, False]
    assert not Faults(str(tmp_path), {}, 0).nan(3)  # once per run: recorded in storage
    monkeypatch.delenv("COATNET_SCALE_FAULT")
    assert not Faults(str(tmp_path / "other"), {}, 0).nan(3)  # inert unless set


def torchrun(tmp_path, corpus, fault: str, *overrides: str, processes: int = 2, timeout: float = 600):
    settings = [f"storage.url={tmp_path}", f"data.train_manifest={corpus}/train/manifest.json",
                f"data.val_manifest={corpus}/val/manifest.json", "monitoring.enabled=false", *overrides]
    command = [TORCHRUN, f"--nproc-per-node={processes}", "-m", "coatnet_scale.pretrain", "--config", str(TINY),
               "--without-ray", *(f"--set={s}" for s in settings)]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                            env={**os.environ, "COATNET_SCALE_FAULT": fault})
    return result, time.monotonic() - start


def pretrain(tmp_path, corpus, fault: str, *overrides: str, timeout: float = 600):
    """One process, launched directly, so its exit code is the loop's (torchrun's is 1 for any)."""
    settings = [f"storage.url={tmp_path}", f"data.train_manifest={corpus}/train/manifest.json",
                f"data.val_manifest={corpus}/val/manifest.json", "monitoring.enabled=false", "data.num_workers=0",
                *overrides]
    command = [sys.executable, "-m", "coatnet_scale.pretrain", "--config", str(TINY), "--without-ray",
               *(f"--set={s}" for s in settings)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, "COATNET_SCALE_FAULT": fault})


@pytest.mark.slow
def test_a_diverging_run_stops_with_exit_78_and_stays_stopped(demo_corpus, tmp_path):
    """The issue's lr 50: steps skipped, rolled back once, then stopped, loudly, with the
    do-not-requeue code; no checkpoint is written once steps are being skipped. The same command
    again refuses at once with one line naming the reason and the switch; the switch starts it
    from the newest complete checkpoint."""
    diverging = ["train.lr=50", "train.warmup_steps=2", "train.total_steps=60", "checkpoint.every_steps=3",
                 "train.max_rollbacks=1"]
    result = pretrain(tmp_path, demo_corpus, "", *diverging)
    output = result.stdout + result.stderr
    assert result.returncode == 78, output[-4000:]
    assert "finished" not in output
    stop = next(line for line in result.stderr.splitlines() if line.startswith("pretrain: tiny stopped: step "))
    assert "after 1 rollback(s) to the last good checkpoint" in stop and "train.max_rollbacks 1" in stop
    assert stop.endswith("run once with --set train.override_stop=true (exit code 78)"), stop
    (record,) = read_rollbacks(str(tmp_path / "tiny"), {})
    trouble = record["first_bad_step"]
    written = [int(p.parent.name[len("step_"):]) for p in (tmp_path / "tiny" / "checkpoints").glob("*/COMPLETE.json")]
    assert written and all(step < trouble for step in written), (written, record)
    reason = json.loads((tmp_path / "tiny" / "STOPPED.json").read_text())["reason"]

    again = pretrain(tmp_path, demo_corpus, "", *diverging)  # a requeue, or the command run again
    refusals = [line for line in again.stderr.splitlines() if line.startswith("pretrain: tiny stopped:")]
    assert again.returncode == 78 and len(refusals) == 1, again.stdout[-3000:] + again.stderr[-3000:]
    assert refusals[0].startswith("pretrain: tiny stopped: refusing to start: the run was stopped on purpose at ")
    assert reason in refusals[0] and "--set train.override_stop=true" in refusals[0]
    assert "ZeRO-" not in again.stdout  # no engine was built

    # Overridden: it starts, from the newest complete checkpoint (ending there: stop_at_step).
    start = max(written)
    fixed = pretrain(tmp_path, demo_corpus, "", *diverging, f"train.stop_at_step={start}", "train.override_stop=true")
    assert fixed.returncode == 0, fixed.stdout[-3000:] + fixed.stderr[-3000:]
    assert "train.override_stop: starting although the run was stopped at" in fixed.stdout
    assert f"tiny/checkpoints/step_{start:09d}: step {start}," in fixed.stdout
    assert not (tmp_path / "tiny" / "STOPPED.json").exists()
    assert len(list((tmp_path / "tiny").glob("STOPPED-overridden-*.json"))) == 1


@pytest.mark.slow
def test_a_frozen_rank_under_torchrun_its_peer_dumps_and_all_end(demo_corpus, tmp_path):
    """Rank 1 stops itself (SIGSTOP) at step 3, after the checkpoint of step 2. Rank 0 waits in a
    collective until its watchdog (hang_timeout_s 15) dumps its stacks and exits 1; torchrun
    then ends the frozen rank. The same command resumes from step 2 and finishes."""
    settings = ("train.hang_timeout_s=15", "train.total_steps=4", "checkpoint.every_steps=2")
    result, seconds = torchrun(tmp_path, demo_corpus, "hang@step=3,rank=1", *settings)
    output = result.stdout + result.stderr
    # torchrun exits 1 and names the first failure: rank 0, ended by its watchdog with code 1.
    assert result.returncode == 1, output[-3000:]
    assert re.search(r"Root Cause \(first observed failure\):\s*\[0\]:(.*\n){0,3}\s*rank\s*: 0 \(local_rank: 0\)\s*"
                     r"\n\s*exitcode\s*: 1 ", output), output[-3000:]
    dumps = {p.name: p.read_text() for p in (tmp_path / "tiny" / "diagnostics" / "standalone").iterdir()}
    stacks = next(text for name, text in dumps.items() if "-rank00000-" in name)
    assert "most recent call first" in stacks and "worker.py" in stacks, stacks[-2000:]
    frozen = next(name for name in dumps if "-rank00001-" in name)
    assert dumps[frozen] == ""  # a frozen rank cannot dump itself
    with pytest.raises(ProcessLookupError):
        os.kill(int(frozen.rsplit("-pid", 1)[1].removesuffix(".txt")), 0)
    assert "watchdog: a rank whose step takes over 15 s" in result.stdout
    saved = sorted(p.parent.name for p in (tmp_path / "tiny" / "checkpoints").glob("*/COMPLETE.json"))
    assert saved == ["step_000000002"], saved
    resumed, _ = torchrun(tmp_path, demo_corpus, "hang@step=3,rank=1", *settings)  # the fault fired once: a clean run
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {tmp_path}/tiny/checkpoints/step_000000002: step 2, epoch 0" in resumed.stdout
    assert "step 4/4" in resumed.stdout


def test_a_rollback_skips_at_most_one_epoch_and_records_the_cut(demo_corpus, tmp_path):
    """A rollback to a checkpoint far behind the trouble asks to skip more batches than the data
    holds: it skips one epoch's, from where the checkpoint stood, and says so in its record."""
    from coatnet_scale.data import train_loader

    config = Config(data={"train_manifest": f"{demo_corpus}/train/manifest.json", "num_workers": 0},
                    train={"micro_batch_size": 32, "global_batch_size": 32})
    loader = train_loader(config, 0, 1)
    per_epoch = loader.batches_in(0)
    asked = {"time": 0.0, "step": 5000, "first_bad_step": 5000, "reason": "loss spike", "checkpoint": None,
             "checkpoint_step": 0, "skip_steps": 5000}
    (tmp_path / "health").mkdir()
    (tmp_path / "health" / "rollback-1.json").write_text(json.dumps(asked))
    h = health(tmp_path, read_rollbacks(str(tmp_path), {}))
    assert h.skip(loader, {"world_size": 1}, 1, 0, 3, ()) == (1, 3, ())  # one epoch on from batch 3
    (record,) = read_rollbacks(str(tmp_path), {})
    assert (record["skip_steps"], record["skip_steps_requested"]) == (per_epoch, 5000)
    assert [(s["epoch"], s["from_batch"], s["to_batch"]) for s in record["skipped"]] == [(0, 3, per_epoch),
                                                                                         (1, 0, 3)]


RANK = """
import sys, time
from coatnet_scale.engine.watchdog import Watchdog
run, endpoint, rank, hang = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "hang"
watchdog = Watchdog(run, {"endpoint_url": endpoint}, "job", rank)
if hang:  # a rank of the killed attempt: once all are up, its step never ends, so it dumps and exits
    print("ready", flush=True)
    sys.stdin.readline()
    watchdog.arm(0.5)
    time.sleep(60)
watchdog.close()
print("started", flush=True)
"""


def test_two_ranks_on_a_node_upload_each_leftover_dump_once(s3_endpoint, s3_bucket, tmp_path):
    """An attempt whose 3 ranks on one node hung left 3 stack dumps in the node's folder. The
    next attempt's 2 ranks on that node start together and each uploads what it finds, through a
    slow link (so both are at it at once); each dump reaches the store exactly once, neither
    rank fails on a dump the other took, and the node's folder keeps none."""
    from s3proxy import LoopbackProxy

    proxy = LoopbackProxy(int(s3_endpoint.rsplit(":", 1)[1]), rate=64 * 2**10, refuse=lambda method, path: False)
    run = f"s3://{s3_bucket}/run"
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the node-local folder, this test's own

    def ranks(how: str, count: int) -> list[subprocess.Popen]:
        return [subprocess.Popen([sys.executable, "-c", RANK, run, proxy.endpoint, str(r), how], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for r in range(count)]

    killed = ranks("hang", 3)
    assert [rank.stdout.readline() for rank in killed] == ["ready\n"] * 3  # none found another's dump
    for rank in killed:
        rank.communicate("\n", timeout=60)
        assert rank.returncode == 1
    folder = next(tmp_path.glob("coatnet_scale_diagnostics/*"))
    dumps = sorted(p.name for p in folder.iterdir())
    assert len(dumps) == 3 and all((folder / d).stat().st_size > 0 for d in dumps)

    for rank in ranks("start", 2):
        out, err = rank.communicate(timeout=120)
        assert rank.returncode == 0 and "started" in out, err
    uploads = [path.rsplit("/", 1)[-1] for method, path, _ in proxy.seen if method == "PUT" and "/diagnostics/" in path]
    assert sorted(uploads) == dumps
    fs, _ = url_to_fs(run, storage_options(StorageConfig(endpoint_url=s3_endpoint)))
    stored = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/run/diagnostics/job"))
    assert stored == dumps and all("Timeout (0:00:00.500000)!" in fs.cat_file(f"{s3_bucket}/run/diagnostics/job/{d}").decode() for d in dumps)
    assert list(folder.iterdir()) == []
