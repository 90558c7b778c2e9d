"""Run health (engine/health.py, engine/watchdog.py, engine/faults.py): the verdicts on one rank,
then real runs under torchrun: a diverging run (lr 50) stopped with exit 1, a frozen rank's peer
dumping its stacks and all ending; two ranks of a node uploading a killed attempt's dumps to S3. test_finetune.py's Ray run has the rest: a NaN rolled back
with its skipped samples listed by the keys CLI, a frozen worker caught and resumed, a slow rank
named, and the run in its accuracy band."""
import math
import os
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
        agreed = h.agree(1, 2.0, 1.0, True, 0, 64, 0.1, signalled=True)  # a stop signal rides on the same reduction
        assert (agreed["loss"], agreed["signalled"]) == (2.0, 1)
        assert h.agree(2, 2.0, math.inf, False, 0, 64, 0.1) and not h.healthy  # skipped: no checkpoint now
        assert h.agree(3, 2.0, math.inf, False, 0, 64, 0.1)
        with pytest.raises(Rollback, match="3 steps in a row skipped"):
            h.agree(4, 2.0, math.inf, False, 0, 64, 0.1)
        (record,) = read_rollbacks(str(tmp_path), {})
        assert (record["step"], record["first_bad_step"], record["checkpoint"], record["skip_steps"]) == (4, 2, None, 4)
        # The next attempt starts from the same (no) checkpoint: max_rollbacks 1 is spent.
        h = health(tmp_path, read_rollbacks(str(tmp_path), {}))
        stop = h.agree(5, math.nan, None, True, 0, 64, 0.1)["stopped"]
        assert stop.startswith("step 5: the loss is not finite on 1 rank(s); after 1 rollback(s) to the last good "
                               "checkpoint, none (the run has no checkpoint yet)")


def test_a_loss_spike_rolls_back_after_64_steps(tmp_path):
    with collectives.audit(torch.device("cpu")):
        h = health(tmp_path, spike_window=64)
        for step in range(1, 64):
            h.agree(step, 2.0 + 0.01 * (step % 3), 1.0, True, 0, 64, 0.1)
        h.agree(64, 9.0, 1.0, True, 0, 64, 0.1)  # too few steps to judge yet: taken as a step
        h = health(tmp_path, spike_window=64)
        for step in range(1, 65):
            h.agree(step, 2.0 + 0.01 * (step % 3), 1.0, True, 0, 64, 0.1)
        with pytest.raises(Rollback, match="loss spike: 9 above the mean 2.01"):
            h.agree(65, 9.0, 1.0, True, 0, 64, 0.1)


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


@pytest.mark.slow
def test_a_diverging_run_stops_with_exit_1(demo_corpus, tmp_path):
    """The issue's lr 50, on one process: steps skipped, rolled back once, then stopped, loudly;
    no checkpoint is written once steps are being skipped."""
    result, _ = torchrun(tmp_path, demo_corpus, "", "train.lr=50", "train.warmup_steps=2", "train.total_steps=60",
                         "checkpoint.every_steps=3", "train.max_rollbacks=1", "data.num_workers=0", processes=1)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    assert "finished" not in output
    stop = next(line for line in result.stderr.splitlines() if line.startswith("pretrain: tiny stopped: step "))
    assert "after 1 rollback(s) to the last good checkpoint" in stop and "train.max_rollbacks 1" in stop
    (record,) = read_rollbacks(str(tmp_path / "tiny"), {})
    trouble = record["first_bad_step"]
    written = [int(p.parent.name[len("step_"):]) for p in (tmp_path / "tiny" / "checkpoints").glob("*/COMPLETE.json")]
    assert all(step < trouble for step in written), (written, record)


@pytest.mark.slow
def test_a_frozen_rank_under_torchrun_its_peer_dumps_and_all_end(demo_corpus, tmp_path):
    """Rank 1 stops itself (SIGSTOP) at step 3. Rank 0 waits in a collective until its watchdog
    (hang_timeout_s 15) dumps its stacks and ends it; torchrun then ends the frozen rank."""
    result, seconds = torchrun(tmp_path, demo_corpus, "hang@step=3,rank=1", "train.hang_timeout_s=15",
                               "train.total_steps=20")
    assert result.returncode != 0
    dumps = {p.name: p.read_text() for p in (tmp_path / "tiny" / "diagnostics" / "standalone").iterdir()}
    stacks = next(text for name, text in dumps.items() if "-rank00000-" in name)
    assert "most recent call first" in stacks and "worker.py" in stacks, stacks[-2000:]
    frozen = next(name for name in dumps if "-rank00001-" in name)
    assert dumps[frozen] == ""  # a frozen rank cannot dump itself
    with pytest.raises(ProcessLookupError):
        os.kill(int(frozen.rsplit("-pid", 1)[1].removesuffix(".txt")), 0)
    assert "watchdog: a rank whose step takes over 15 s" in result.stdout


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
