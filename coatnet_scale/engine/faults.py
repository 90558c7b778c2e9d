"""Fault injection, for tests only: inert unless COATNET_SCALE_FAULT is set.

    COATNET_SCALE_FAULT=nan@step=25            rank 0's loss is NaN at step 25 (rank=R for another)
    COATNET_SCALE_FAULT=hang@step=12,rank=1    rank 1 freezes (SIGSTOP to itself) at the start of step 12
    COATNET_SCALE_FAULT=slow@step=5,rank=1,seconds=0.5   rank 1's compute takes 0.5 s longer from step 5
    COATNET_SCALE_FAULT=slowupload@step=4,seconds=60   rank 0's upload of the step-4 checkpoint pauses 60 s
                                                       after its first file (a background upload, killed mid-way)
    COATNET_SCALE_FAULT=failupload@step=4,rank=1     rank 1's upload of the step-4 checkpoint fails: the store
                                                     refuses a write (a real error from S3 or the filesystem)
    COATNET_SCALE_FAULT=infgrad@step=5,steps=3       rank 0's gradients are infinite (its loss finite) at steps
                                                     5-7: DeepSpeed skips them
    COATNET_SCALE_FAULT='slow@step=5,rank=1,seconds=0.5;nan@step=9'   several, separated by ';'

A fault fires once per run: the rank it hits first records it under
{storage.url}/{run_name}/health/faults/, and a later attempt (a restart, a rollback) finds the
record and runs clean. A slow fault lasts the rest of the attempt it started in.
"""
from __future__ import annotations

import json
import os
import signal
import time

from coatnet_scale.storage import url_to_fs, write_atomic

VARIABLE = "COATNET_SCALE_FAULT"
KINDS = ("nan", "hang", "slow", "slowupload", "failupload", "infgrad")


def parse(text: str) -> dict:
    """{"kind", "step", "rank", "seconds", "steps"} from `kind@step=N[,rank=R][,seconds=S][,steps=K]`;
    a clear error else."""
    kind, _, rest = text.strip().partition("@")
    fields = dict(part.split("=", 1) for part in rest.split(",") if "=" in part)
    if kind not in KINDS or "step" not in fields or set(fields) - {"step", "rank", "seconds", "steps"} or \
            (kind in ("slow", "slowupload") and "seconds" not in fields) or ("steps" in fields and kind != "infgrad"):
        raise ValueError(f"{VARIABLE}={text!r}: expected nan@step=N[,rank=R], hang@step=N[,rank=R], "
                         f"slow@step=N,rank=R,seconds=S, slowupload@step=N[,rank=R],seconds=S, "
                         f"failupload@step=N[,rank=R] or infgrad@step=N[,rank=R][,steps=K]")
    parsed = {"kind": kind, "step": int(fields["step"]), "rank": int(fields.get("rank", 0)),
              "seconds": float(fields.get("seconds", 0))}
    return {**parsed, "steps": int(fields.get("steps", 1))} if kind == "infgrad" else parsed


class Faults:
    """This rank's view of the injected faults (none when the variable is unset)."""

    def __init__(self, run_url: str, storage_options: dict, rank: int):
        text = os.environ.get(VARIABLE, "")
        self.faults = {f["kind"]: f for f in map(parse, filter(str.strip, text.split(";")))}
        self.rank = rank
        self.slow = 0.0  # seconds added to every step's compute once a slow fault fired
        self.infinite_until = 0  # the last step an infgrad fault makes infinite
        self.fs, self.root = url_to_fs(f"{run_url.rstrip('/')}/health/faults", storage_options)

    def _fires(self, kind: str, step: int) -> bool:
        f = self.faults.get(kind)
        if f is None or f["rank"] != self.rank or step != f["step"]:
            return False
        record = f"{self.root}/{kind}-step{f['step']}-rank{f['rank']}.json"
        if self.fs.exists(record):  # fired in an earlier attempt of the run
            return False
        write_atomic(self.fs, record, json.dumps({**f, "time": time.time()}).encode())
        print(f"fault injection ({VARIABLE}): {kind} on rank {self.rank} at step {step}", flush=True)
        return True

    def nan(self, step: int) -> bool:
        return self._fires("nan", step)

    def hang(self, step: int) -> None:
        if self._fires("hang", step):
            os.kill(os.getpid(), signal.SIGSTOP)  # frozen, as a hung GPU or a stalled read leaves a process

    def delay(self, step: int) -> None:
        if self._fires("slow", step):
            self.slow = self.faults["slow"]["seconds"]
        if self.slow:
            time.sleep(self.slow)

    def inf_grad(self, step: int) -> bool:
        """Whether this step's gradients are made infinite (the loss stays finite)."""
        if self._fires("infgrad", step):
            self.infinite_until = step + self.faults["infgrad"]["steps"] - 1
        return step <= self.infinite_until

    def fail_upload(self, step: int) -> bool:
        """Called by the checkpoint upload before its first file: whether to make it fail."""
        return self._fires("failupload", step)

    def slow_upload(self, step: int) -> None:
        """Called by the checkpoint upload (engine/checkpoint.py) after its first file."""
        if self._fires("slowupload", step):
            time.sleep(self.faults["slowupload"]["seconds"])
