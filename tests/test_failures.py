"""The record that stops a job retrying an error that repeats with no progress (engine/failures.py).
The job stopped for real, under Ray, is test_pretrain.py's; these check the decision itself."""
from coatnet_scale.engine.failures import FailureLog, error_signature


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
