"""Fault injection, for tests only: inert unless COATNET_SCALE_FAULT is set.

    COATNET_SCALE_FAULT=nan@step=25            rank 0's loss is NaN at step 25 (rank=R for another)
    COATNET_SCALE_FAULT=hang@step=12,rank=1    rank 1 freezes (SIGSTOP to itself) at the start of step 12
    COATNET_SCALE_FAULT=slow@step=5,rank=1,seconds=0.5   rank 1's compute takes 0.5 s longer from step 5
    COATNET_SCALE_FAULT=slowupload@step=4,seconds=60   rank 0's upload of the step-4 checkpoint pauses 60 s
                                                       after its first file (a background upload, killed mid-way)
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
KINDS = ("nan", "hang", "slow", "slowupload")


def parse(text: str) -> dict:
    """{"kind", "step", "rank", "seconds"} from `kind@step=N[,rank=R][,seconds=S]`; a clear error else."""
    kind, _, rest = text.strip().partition("@")
    fields = dict(part.split("=", 1) for part in rest.split(",") if "=" in part)
    if kind not in KINDS or "step" not in fields or set(fields) - {"step", "rank", "seconds"} or \
            (kind in ("slow", "slowupload") and "seconds" not in fields):
        raise ValueError(f"{VARIABLE}={text!r}: expected nan@step=N[,rank=R], hang@step=N[,rank=R], "
                         f"slow@step=N,rank=R,seconds=S or slowupload@step=N[,rank=R],seconds=S")
    return {"kind": kind, "step": int(fields["step"]), "rank": int(fields.get("rank", 0)),
            "seconds": float(fields.get("seconds", 0))}


class Faults:
    """This rank's view of the injected faults (none when the variable is unset)."""

    def __init__(self, run_url: str, storage_options: dict, rank: int):
        text = os.environ.get(VARIABLE, "")
        self.faults = {f["kind"]: f for f in map(parse, filter(str.strip, text.split(";")))}
        self.rank = rank
        self.slow = 0.0  # seconds added to every step's compute once a slow fault fired
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

    def slow_upload(self, step: int) -> None:
        """Called by the checkpoint upload (engine/checkpoint.py) after its first file."""
        if self._fires("slowupload", step):
            time.sleep(self.faults["slowupload"]["seconds"])
