"""The record that stops a job retrying an error that repeats with no progress (engine/failures.py).
The job stopped for real, under Ray, is test_pretrain.py's; these check the decision itself, and
that throttled storage is retried and never counts as a repeated error."""
import json

import pytest
from s3proxy import LoopbackProxy

from coatnet_scale.config import StorageConfig
from coatnet_scale.engine.failures import FailureLog, error_signature
from coatnet_scale.storage import storage_options, transient, url_to_fs, write_atomic


def fail(log: FailureLog, resumed_from, error: Exception, node="node-a", step=3):
    attempt, stop = log.start(resumed_from, rank=0, nodes=[node])
    assert stop is None
    log.record(attempt, rank=0, step=step, error=error)


def test_the_same_error_twice_from_the_same_checkpoint_stops(tmp_path):
    log = FailureLog(str(tmp_path), {}, "job1")
    fail(log, "step_000000100", KeyError("model.head"))
    fail(log, "step_000000100", KeyError("model.head"))
    _, stop = log.start("step_000000100", rank=0, nodes=["node-a"])
    assert stop is not None and "KeyError: 'model.head'" in stop and "checkpoint step_000000100" in stop
    assert log.stopped() == stop  # what the driver reads and prints
    # Another job (a requeue, or the command run again) refuses, naming the reason and the switch,
    # under any launcher; the switch sets the record aside once.
    for job in ("job2", None):
        refusal = FailureLog(str(tmp_path), {}, job).start("step_000000100", 0, ["node-a"])[1]
        assert refusal.startswith("refusing to start: the run was stopped on purpose at ") and \
            refusal.endswith("run the command once with --set train.override_stop=true") and stop in refusal
    assert FailureLog(str(tmp_path), {}, "job2").start("step_000000100", 0, ["node-a"], override=True)[1] is None
    assert FailureLog(str(tmp_path), {}, "job3").start("step_000000100", 0, ["node-a"])[1] is None
    assert len(list(tmp_path.glob("STOPPED-overridden-*.json"))) == 1


def test_progress_a_changed_group_or_another_error_goes_on(tmp_path):
    log = FailureLog(str(tmp_path), {}, "job")
    fail(log, "step_000000100", RuntimeError("boom"))
    fail(log, "step_000000200", RuntimeError("boom"))  # a checkpoint was written in between
    assert log.start("step_000000200", 0, ["node-a"])[1] is None
    fail(log, "step_000000200", RuntimeError("boom"), node="node-b")  # a lost node: the group moved
    assert log.start("step_000000200", 0, ["node-b"])[1] is None
    fail(log, "step_000000200", ValueError("other"), node="node-b")
    assert log.start("step_000000200", 0, ["node-b"])[1] is None
    assert log.stopped() is None


def test_an_error_from_a_dataloader_worker_is_named_by_its_original_line():
    wrapped = FileNotFoundError("Caught FileNotFoundError in DataLoader worker process 0.\nOriginal Traceback "
                                "(most recent call last):\n  File \"x.py\", line 1\nFileNotFoundError: train-000003.tar")
    assert error_signature(wrapped) == "FileNotFoundError: train-000003.tar"
    assert error_signature(ValueError("bad value\nmore")) == "ValueError: bad value"


def test_the_first_failing_rank_may_change_between_attempts(tmp_path):
    """Two ranks each fail on their own missing shard; which records first is a race. The
    repeat is still seen when the ranks swap places (the CI failure that ran a third attempt),
    or when only one rank recorded before its group was stopped."""
    log = FailureLog(str(tmp_path), {}, "job")
    for first, second in ((0, 1), (1, 0)):
        attempt, stop = log.start(None, rank=0, nodes=["node-a"])
        assert stop is None
        for rank in (first, second):
            log.record(attempt, rank=rank, step=0, error=FileNotFoundError(f"train-00000{rank}.tar"))
    _, stop = log.start(None, rank=0, nodes=["node-a"])
    assert stop is not None and "FileNotFoundError: train-00000" in stop and "the beginning" in stop
    log = FailureLog(str(tmp_path), {}, "job2")
    for rank in (0, 1):
        attempt, _ = log.start(None, rank=0, nodes=["node-a"])
        log.record(attempt, rank=rank, step=0, error=FileNotFoundError(f"train-00000{rank}.tar"))
    assert log.start(None, rank=0, nodes=["node-a"])[1] is not None


def test_throttled_storage_is_retried_and_never_stops_the_job(s3_endpoint, s3_bucket, caplog):
    """The S3 endpoint behind a proxy that answers chosen requests 503 SlowDown. A checkpoint
    marker's write that meets it twice is retried inside the storage call and lands. Throttling
    that outlasts the retries raises, and two attempts that end with it do not stop the job;
    two that end with the same deterministic storage error (a missing bucket) do."""
    refused = {"COMPLETE": 2, "hot": 10**6}  # key part → how many of its PUTs to refuse

    def refuse(method: str, path: str) -> bool:
        key = next((k for k in refused if k in path), None)
        if method != "PUT" or key is None or refused[key] == 0:
            return False
        refused[key] -= 1
        return True

    proxy = LoopbackProxy(int(s3_endpoint.rsplit(":", 1)[1]), refuse=refuse)
    options = storage_options(StorageConfig(endpoint_url=proxy.endpoint, retries=2))
    fs, run = url_to_fs(f"s3://{s3_bucket}/run", options)
    write_atomic(fs, f"{run}/checkpoints/step_000000010/COMPLETE.json", b'{"step": 10}')
    assert fs.cat_file(f"{run}/checkpoints/step_000000010/COMPLETE.json") == b'{"step": 10}'
    assert [r for m, p, r in proxy.seen if m == "PUT" and "COMPLETE" in p] == [True, True, False]
    assert sum("storage: S3 request retried" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records) >= 2

    options = storage_options(StorageConfig(endpoint_url=proxy.endpoint, retries=1))  # s3fs's own 5 tries only
    fs, run = url_to_fs(f"s3://{s3_bucket}/run", options)
    log = FailureLog(f"s3://{s3_bucket}/run", options, "job")
    for _ in range(2):
        with pytest.raises(OSError) as throttled:
            write_atomic(fs, f"{run}/checkpoints/step_000000020/hot.pt", b"x")
        assert transient(throttled.value) and "reduce your request rate" in str(throttled.value)
        fail(log, "step_000000010", throttled.value)
    assert log.start("step_000000010", rank=0, nodes=["node-a"])[1] is None
    assert all(json.loads(fs.cat_file(p))["transient"] for p in fs.glob(f"{run}/failures/job/*-rank*.json"))

    gone, _ = url_to_fs(f"s3://{s3_bucket}-missing/run", options)
    for _ in range(2):
        with pytest.raises(OSError) as missing:
            write_atomic(gone, f"{s3_bucket}-missing/run/checkpoints/step_000000020/COMPLETE.json", b"{}")
        assert not transient(missing.value)
        fail(log, "step_000000010", missing.value)
    _, stop = log.start("step_000000010", rank=0, nodes=["node-a"])
    assert stop is not None and "bucket" in stop.lower()
