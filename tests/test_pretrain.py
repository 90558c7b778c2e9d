"""The pretraining engine: DeepSpeed ZeRO-3 on 2 CPU workers under a local Ray, exact resume,
and fast failure on bad configs. The run on a real `ray start` cluster, with a killed worker,
is in test_finetune.py, where the fine-tuning hand-off starts from it."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"


def pretrain_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "coatnet_scale.pretrain", "--config", str(TINY), *(f"--set={o}" for o in overrides)]


def absolute_data(corpus: Path) -> list[str]:
    return [f"data.train_manifest={corpus}/train/manifest.json", f"data.val_manifest={corpus}/val/manifest.json"]


def read_metrics(storage: Path, run_name: str) -> dict:
    files = sorted((storage / run_name).glob("metrics-step*.json"))
    return json.loads(files[-1].read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, message",
    [
        (("cluster.num_workers=3", "train.elastic_batch_tolerance=0"),
         "train.global_batch_size=64 is not train.micro_batch_size=32 x train.grad_accum_steps=1 x cluster.num_workers=3 "
         "(= 96), and train.global_batch_size=64 cannot be made by 3 workers with micro-batches of 16..32 (the nearest is "
         "63, 1.56% off); worker counts that make it: 64, 32, 16"),
        ("model.name=coatnet_9", "model.name: unknown model; did you mean coatnet_"),
        ("data.train_manifest=/nonexistent/train/manifest.json", "data.train_manifest: cannot read /nonexistent/train/manifest.json"),
        ("storage.url=/proc/coatnet-scale-cannot-write-here", "storage.url: cannot use /proc/coatnet-scale-cannot-write-here"),
        ("model.num_classes=7", "has 10 classes but model.num_classes is 7"),
    ],
)
def test_bad_config_fails_before_any_worker(demo_corpus, tmp_path, override, message):
    start = time.monotonic()
    overrides = override if isinstance(override, tuple) else (override,)
    result = subprocess.run(pretrain_command(f"storage.url={tmp_path}", *overrides), capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "Ray" not in result.stderr  # no cluster was started
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_more_workers_than_the_cluster_holds(demo_corpus, tmp_path):
    result = subprocess.run(
        pretrain_command(f"storage.url={tmp_path}", "cluster.num_workers=16", "train.global_batch_size=512"),
        capture_output=True, text=True, cwd=REPO, timeout=180,
    )
    assert result.returncode == 2
    assert re.search(r"pretrain: cluster: 16 workers need 16 CPU in all, the Ray cluster has \d+", result.stderr)
    assert "RayTrainWorker" not in result.stdout + result.stderr


def scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as response:
        return response.read().decode()


@pytest.mark.slow
def test_resume_after_a_signal_is_bit_identical(demo_corpus, tmp_path, s3_endpoint, s3_bucket, unused_tcp_port):
    """44 steps straight == SIGTERM to torchrun in a window of skipped steps (38-40), the
    checkpoint the ranks saved at the first step after it (41; exit code 75), the same command
    again: the same losses, weights and EMA to the last bit, with stochastic depth on (RNG
    states) and checkpointing mid-epoch (loader position). Two ranks under ZeRO-3: the signalled
    run as `srun` starts them (one process per rank, each signalled, each exit code seen), the
    others under torchrun. The straight run saves synchronously to a local folder; the
    signalled one to S3 with background upload, where rank 1's upload of step 20 fails for real
    (the bucket it writes to does not exist): the save is dropped on both ranks, named and
    counted, training goes on, and the signal's save completes."""
    import s3fs

    overrides = [*absolute_data(demo_corpus), "train.total_steps=44", "train.warmup_steps=3",
                 "train.log_every=1", "checkpoint.every_steps=20", "model.drop_path_rate=0.2", "data.randaugment_ops=2",
                 "train.ema_decay=0.5", "train.max_skipped_steps=4"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node=2", "-m", "coatnet_scale.pretrain",
                "--config", str(TINY), "--without-ray"]
    runs = f"s3://{s3_bucket}/runs"
    storage = {"resumed": runs, "straight": str(tmp_path)}
    skips = "infgrad@step=38,steps=3"  # DeepSpeed skips steps 38-40 (infinite gradients): in both runs
    faults = {"resumed": f"{skips};failupload@step=20,rank=1;slow@step=37,rank=0,seconds=1", "straight": skips}
    monitoring = {"resumed": ["monitoring.enabled=true"], "straight": ["monitoring.enabled=false"]}

    def command(run: str) -> list[str]:
        settings = [*overrides, *monitoring[run], f"storage.url={storage[run]}", f"run_name={run}"]
        return [*torchrun, *(f"--set={o}" for o in settings)]

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    env = {**os.environ, "COATNET_SCALE_FAULT": faults["resumed"], "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(unused_tcp_port), "WORLD_SIZE": "2"}
    ranks = [sys.executable, *command("resumed")[2:]]  # python -m coatnet_scale.pretrain ..., without torchrun
    # The signalled run first, alone on the cores, so the straight run's time is not in its window.
    with open(tmp_path / "rank1.log", "w") as rank1_log, \
            subprocess.Popen(ranks, stdout=rank1_log, stderr=subprocess.STDOUT, cwd=REPO,
                             env={**env, "RANK": "1", "LOCAL_RANK": "1"}) as peer, \
            subprocess.Popen(ranks, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                             env={**env, "RANK": "0", "LOCAL_RANK": "0"}) as process:
        output, counted = "", ""
        for line in process.stdout:
            output += line
            if line.startswith("checkpoint step 20 dropped"):  # rank 1's exporter, listed in the run's targets
                targets = json.loads(fs.cat_file(f"{s3_bucket}/runs/prometheus/resumed.json"))
                exporter = next(t["targets"][0] for t in targets if t["labels"]["rank"] == "1")
                for _ in range(20):  # rank 1 counts it at the same step boundary as rank 0 logs it
                    counted = scrape(exporter)
                    if "coatnet_checkpoint_failed_saves_total" in counted and " 1.0" in counted:
                        break
                    time.sleep(0.25)
            if line.startswith("step 38 skipped"):  # the signal lands while steps 39-40 are skipped
                for rank in (process, peer):  # as srun passes it to every task
                    rank.send_signal(signal.SIGTERM)
                break
        output += process.stdout.read()
        process.wait(timeout=120)
        peer.wait(timeout=120)
    # Step 20's save: dropped on every rank, named, counted; no file, no marker.
    assert ("checkpoint step 20 dropped on every rank (no marker; its files removed): rank 1: FileNotFoundError: "
            "The specified bucket does not exist; 1 save(s) in a row failed") in output, output[-3000:]
    assert re.search(r'coatnet_checkpoint_failed_saves_total\{[^}]*rank="1"[^}]*\} 1\.0', counted), counted[-2000:]
    assert not fs.exists(f"{s3_bucket}/runs/resumed/checkpoints/step_000000020")
    # The signal, caught in the skip window, waited for the first step that was not skipped.
    deferred = re.search(r"signal: SIGTERM reached 2 rank\(s\): step (39|40) was skipped, so the checkpoint waits",
                         output)
    assert deferred and "checkpoint step 40 not written: steps are being skipped" in output, output[-3000:]
    assert "signal: SIGTERM reached 2 rank(s): saving a checkpoint at step 41 and exiting (code 75)" in output
    step = 41
    marker = json.loads(fs.cat_file(f"{s3_bucket}/runs/resumed/checkpoints/step_{step:09d}/COMPLETE.json"))
    assert marker["step"] == step and marker["signal"] == "SIGTERM"
    assert "checkpoint step 20 staged" in output and "uploading to" in output  # in the background
    assert "stopped on SIGTERM at step 41" in output and "(exit code 75)" in output, output[-3000:]
    assert process.returncode == peer.returncode == 75, (process.returncode, peer.returncode)
    for run in ("resumed", "straight"):
        result = subprocess.run(command(run), capture_output=True, text=True, cwd=REPO, timeout=600,
                                env={**os.environ, "COATNET_SCALE_FAULT": faults[run]})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        output += result.stdout + result.stderr
    assert f"resumed from {runs}/resumed/checkpoints/step_{step:09d}: step {step}, epoch" in output
    assert "saved on a signal notice" in output
    straight = read_metrics(tmp_path, "straight")["history"]
    first = json.loads(fs.cat_file(f"{s3_bucket}/runs/resumed/metrics-step{step:09d}.json"))["history"]
    second = json.loads(fs.cat_file(f"{s3_bucket}/runs/resumed/metrics-step000000044.json"))["history"]
    assert [h["step"] for h in first + second] == list(range(1, 45))
    assert [h["loss"] for h in first + second] == [h["loss"] for h in straight]
    assert [h["step"] for h in second] == [42, 43, 44]  # several steps after the resume, each equal
    # The weights, and the EMA (kept per rank under ZeRO-3), resumed with the rest: the same bits.
    from coatnet_scale.engine.consolidate import consolidate

    for weights in ("raw", "ema"):
        straight_weights, _ = consolidate(str(tmp_path / "straight"), weights=weights)
        resumed_weights, _ = consolidate(f"{runs}/resumed", {"endpoint_url": s3_endpoint}, weights=weights)
        assert straight_weights.keys() == resumed_weights.keys()
        assert all(torch.equal(straight_weights[k], resumed_weights[k]) for k in straight_weights), weights


@pytest.mark.slow
def test_a_repeated_error_stops_after_one_retry(demo_corpus, tmp_path):
    """Shards gone after preflight read the manifest: every attempt fails the same way before any
    checkpoint. The first retry fails alike, the next group start stops at once and says why,
    although cluster.max_failures would allow more."""
    corpus = tmp_path / "corpus"
    shutil.copytree(demo_corpus / "train", corpus)
    for shard in corpus.glob("*.tar"):
        shard.unlink()
    result = subprocess.run(
        pretrain_command(f"storage.url={tmp_path}", f"data.train_manifest={corpus}/manifest.json",
                         f"data.val_manifest={demo_corpus}/val/manifest.json", "cluster.max_failures=5",
                         "train.total_steps=5", "monitoring.enabled=false"),
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert result.returncode == 78, result.stdout[-3000:] + result.stderr[-3000:]  # do not requeue
    message = next(line for line in result.stderr.splitlines() if line.startswith("pretrain: tiny stopped:"))
    assert message.endswith("a rerun refuses to start until run once with --set train.override_stop=true "
                            "(exit code 78)"), message
    assert message.startswith("pretrain: tiny stopped: the same error ended the last 2 attempts, both started from "
                              "the beginning on 2 workers on 1 node(s)"), message
    assert "FileNotFoundError" in message and "No such file or directory" in message and ".tar" in message
    assert "not retrying" in message
    records = [json.loads(p.read_text()) for p in (tmp_path / "tiny" / "failures").glob("*/*-rank*.json")]
    assert len({r["attempt"] for r in records}) == 2  # the first run and one retry, no more


def test_a_group_of_one_listens_on_loopback_only(monkeypatch):
    """The rendezvous store of `--without-ray`'s group of one (all on this host) is bound to
    127.0.0.1, not to every interface (torch's default: `::`, any address)."""
    import os

    import torch.distributed as dist

    from coatnet_scale.standalone import init_process_group

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # undone after the test, as the group is
    init_process_group(use_gpu=False)
    try:
        port = int(os.environ["MASTER_PORT"])
        listening = [line.split()[1].split(":")[0] for table in ("/proc/net/tcp", "/proc/net/tcp6")
                     for line in Path(table).read_text().splitlines()[1:]
                     if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port]
    finally:
        dist.destroy_process_group()
    assert listening == ["0100007F"]  # 127.0.0.1, little-endian hex; before, :: (all interfaces)
