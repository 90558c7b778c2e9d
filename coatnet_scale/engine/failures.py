"""Stop a job whose worker group keeps failing the same way before it makes any progress.

Ray Train restarts the whole worker group after any error, up to `cluster.max_failures`
times, and cannot be told which errors are worth a retry. A lost node is: the group restarts
on what remains and goes on. A config, data or code error is not: it fails again the same way,
and on 256 GPUs each restart costs minutes. So a rank that fails writes what ended it to the
run's storage, under failures/{job}/, with the checkpoint its attempt started from and the
group's shape (world size and nodes). A group that starts from the same checkpoint, with the
same shape, as the last two failed attempts of its job stops at once and names the error, when
the last attempt's first failure is one the attempt before also ended with. A new checkpoint in
between, or a group of another size or on other nodes, goes on; a new job (running the command
again) starts a new record of attempts. A transient storage error (throttling, a 5xx, a dropped
connection: `storage.transient`, what is left after the storage call's own retries) never
counts: the next attempt may well find the store answering.

A stop stays a stop. Whatever stopped the run on purpose (this rule, or run health: repeated
NaN, repeated rollbacks, repeated failed saves) is written to {run}/STOPPED.json, and the
process exits 78 (engine/interrupt.py EXIT_STOPPED), so a requeue script can tell it from a
resumable failure. Any later start of the run (a requeue, a resubmission, the command run
again, under any launcher) reads that record and refuses with one line naming the reason and
the switch: `--set train.override_stop=true`, passed once after fixing the cause, sets the
record aside (STOPPED-overridden-TIME.json) and starts.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

import torch.distributed as dist

from coatnet_scale.storage import transient, url_to_fs, write_atomic

STOPPED = "STOPPED.json"
OVERRIDE = "train.override_stop"


@dataclass(frozen=True)
class Attempt:
    id: str
    resumed_from: str | None  # the checkpoint tag it started from; None: from the beginning
    shape: str  # world size and nodes


def error_signature(error: BaseException) -> str:
    """The error as two attempts that hit the same cause both describe it. An error re-raised
    from another process (a DataLoader worker) carries the original traceback: its last line."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if any("Traceback (most recent call last)" in line for line in lines):
        return lines[-1].strip()[:500]
    return f"{type(error).__name__}: {lines[0][:500] if lines else ''}".rstrip(": ")


def _without_numbers(signature: str) -> str:
    return re.sub(r"\d+", "#", signature)


class FailureLog:
    """The run's stop record and, for a launcher that restarts (`job` set), this job's attempts."""

    def __init__(self, run_url: str, storage_options: dict, job: str | None):
        self.url = f"{run_url.rstrip('/')}/failures/{job}"
        self.job = job
        self.fs, self.root = url_to_fs(self.url, storage_options)
        _, self.run_root = url_to_fs(run_url.rstrip("/"), storage_options)

    def start(self, resumed_from: str | None, rank: int, nodes: list[str],
              override: bool = False) -> tuple[Attempt, str | None]:
        """Collective. This group's attempt, and the reason to stop instead of training (or None):
        the run's stop record (unless `override`), or an error that repeats. `nodes` names every
        rank's node. Rank 0 alone reads the records and decides; every rank gets its decision."""
        world_size = len(nodes)
        shape = f"{world_size} workers on {len(set(nodes))} node(s) {', '.join(n[:12] for n in sorted(set(nodes)))}"
        decision: list = [None, None]
        if rank == 0:
            decision = [f"{time.time_ns():020d}", self._refusal(override)]
            if decision[1] is None and self.job is not None:
                decision[1] = self._repeated(resumed_from, shape)
                if decision[1] is not None:
                    self.stop(decision[1])
        if world_size > 1:
            dist.broadcast_object_list(decision, src=0)
        return Attempt(decision[0], resumed_from, shape), decision[1]

    def _refusal(self, override: bool) -> str | None:
        """The one line a stopped run refuses with; with `override`, the record set aside."""
        record = self._stop_record()
        if record is None:
            return None
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(record.get("time", 0)))
        if override:
            self.fs.mv(f"{self.run_root}/{STOPPED}", f"{self.run_root}/STOPPED-overridden-{time.time_ns():020d}.json")
            print(f"{OVERRIDE}: starting although the run was stopped at {when}: {record['reason']}", flush=True)
            return None
        return (f"refusing to start: the run was stopped on purpose at {when}: {record['reason']}. Fix the cause, "
                f"then run the command once with --set {OVERRIDE}=true")

    def record(self, attempt: Attempt, rank: int, step: int, error: BaseException) -> None:
        """What ended this rank's attempt (kept only for a launcher that restarts). Never raises:
        the original error matters more."""
        if self.job is None:
            return
        try:
            self._write(f"{attempt.id}-rank{rank:05d}.json", {
                "attempt": attempt.id, "rank": rank, "step": step, "resumed_from": attempt.resumed_from,
                "shape": attempt.shape, "error": error_signature(error), "transient": transient(error),
                "time": time.time(),
            })
        except Exception as e:
            print(f"rank {rank}: cannot record the failure in {self.url}: {type(e).__name__}: {e}", flush=True)

    def stop(self, reason: str) -> None:
        """Record that the run stopped on purpose (run health, a repeated error): the driver
        reads it, and every later start refuses until overridden."""
        write_atomic(self.fs, f"{self.run_root}/{STOPPED}",
                     json.dumps({"reason": reason, "time": time.time(), "job": self.job}).encode())

    def stopped(self) -> str | None:
        """Why the run stopped, if its record says so (read by the driver after the job)."""
        record = self._stop_record()
        return None if record is None else record["reason"]

    def _stop_record(self) -> dict | None:
        try:
            record = json.loads(self.fs.cat_file(f"{self.run_root}/{STOPPED}"))
        except (FileNotFoundError, ValueError):
            return None
        return record if "reason" in record else None

    def _write(self, name: str, record: dict) -> None:
        write_atomic(self.fs, f"{self.root}/{name}", json.dumps(record).encode())

    def _repeated(self, resumed_from: str | None, shape: str) -> str | None:
        if not self.fs.exists(self.root):
            return None
        attempts: dict[str, list[dict]] = {}
        for path in self.fs.glob(f"{self.root}/*-rank*.json"):
            try:
                record = json.loads(self.fs.cat_file(path))
            except (FileNotFoundError, ValueError):
                continue
            attempts.setdefault(record["attempt"], []).append(record)
        failed = [attempts[a] for a in sorted(attempts)]
        if len(failed) < 2:
            return None
        last, before = failed[-1], failed[-2]
        same_start = all(r["resumed_from"] == resumed_from and r["shape"] == shape for r in last + before)
        # What ended an attempt is its first failing rank's error; the others' are often knock-on
        # (a peer gone), which a lost node causes too. Which rank fails first is a race: rank 0
        # may lose it to rank 1 in one attempt and win it the next, and their errors can differ
        # (each names its own shard, and a rank killed with its group records nothing). So the
        # error repeats when any rank of the attempt before ended with it, numbers aside.
        where = min(last, key=lambda r: r["time"])
        repeats = {_without_numbers(r["error"]) for r in before if not r.get("transient")}
        if not same_start or where.get("transient") or _without_numbers(where["error"]) not in repeats:
            return None
        error = where["error"]
        start = f"checkpoint {resumed_from}" if resumed_from else "the beginning"
        return (f"the same error ended the last 2 attempts, both started from {start} on {shape} with no checkpoint "
                f"in between: {error} (rank {where['rank']}, step {where['step']}); not retrying: fix the cause "
                f"and run the command again (it resumes from the newest complete checkpoint)")
