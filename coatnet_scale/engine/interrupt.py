"""A checkpoint when capacity is about to go: a reclaim costs no step trained before its notice.

Two ways a job learns it (docs/elastic.md, "Preemption"):

- Ray (the user's path). A draining node (`ray drain-node`, the autoscaler, or SIGTERM to a
  `ray start --block`, what KubeRay's pod deletion sends) reaches the training function as
  `ray.train.get_preemption_info()`, a barrier every rank must call equally often. The loop asks
  every `checkpoint.preemption_poll_steps` steps; on a notice of a node not seen before, every
  rank saves at that step boundary (the marker records it under "preemption") and training goes
  on until the node goes. Ray then restarts the group from that checkpoint (smaller, under
  `cluster.min_workers`), counted against `cluster.max_preemptions`, not `cluster.max_failures`.
  A ZeRO-3 save needs every rank, the preempted ones too, so it must end before the deadline:
  the log says when the last save took longer than the time left.
- Signals (`--without-ray`: one process, torchrun, Slurm). SIGTERM or SIGUSR1 sets a flag in
  the main thread; the ranks agree at the next step boundary on the per-step all-reduce
  (engine/health.py), save (the marker records the signal under "signal"), and every process
  exits with EXIT_RESUMABLE. The same command resumes.

A signal or notice that comes while steps are being skipped (no checkpoint may be written then)
is kept (`Notices.pending`, which outlives a rollback) and saved for at the next step that is
not skipped. Exit codes (docs/elastic.md): 0 finished, EXIT_RESUMABLE saved on a signal,
EXIT_STOPPED stopped on purpose (run health, a repeated error): do not requeue.

Ray is never imported here: the Ray launcher hands the loop its `get_preemption_info`.
"""
from __future__ import annotations

import signal
import time

EXIT_RESUMABLE = 75  # sysexits.h EX_TEMPFAIL: saved on a signal; run the same command again to resume
# sysexits.h EX_CONFIG: stopped on purpose (engine/failures.py records why); running the same
# command again refuses until a person changes something. Apart from 1 (any crash, worth a
# retry), 2 (a config or input refused before training) and 128+N (killed by signal N).
EXIT_STOPPED = 78
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[str] = []


def catch_signals() -> None:
    """From the main thread (Python runs handlers only there): SIGTERM and SIGUSR1 no longer end
    the process, they ask the loop to save and stop at the next step boundary."""
    for number in SIGNALS:
        signal.signal(number, _note)


def _note(number, frame) -> None:
    _received.append(signal.Signals(number).name)


def signal_received() -> str | None:
    """The first stop signal this process caught, or None."""
    return _received[0] if _received else None


class Notices:
    """Ray's preemption notices, asked for every `poll_steps` steps. `ask` is
    ray.train.get_preemption_info (None without Ray). Outlives rollbacks, so a node's notice
    is acted on once."""

    def __init__(self, ask, poll_steps: int):
        self.ask, self.poll_steps = ask, poll_steps
        self.seen: set[str] = set()  # the preempted nodes already saved for
        self.last_save_s: float | None = None  # how long this job's last save took
        # A drain (signal or notice) not saved for yet: it came while steps were skipped.
        self.pending: dict | None = None
        self.pending_text = ""  # its log line's start

    def new(self, step: int) -> dict | None:
        """At step boundaries, on every rank: a notice of nodes not seen before, as the marker
        records it, or None. Every rank gets rank 0's answer."""
        if self.ask is None or step % self.poll_steps:
            return None
        info = self.ask()
        if info is None or set(info.preempted_node_to_ranks) <= self.seen:
            return None
        self.seen |= set(info.preempted_node_to_ranks)
        return {"notice_step": step, "deadline_ms": info.deadline_ms, "ranks": info.preempted_ranks,
                "nodes": info.preempted_node_ids}

    def situation(self, notice: dict) -> str:
        """The start of a notice's log line: who goes, when, and whether a save fits before."""
        text = f"preemption: node(s) {', '.join(notice['nodes'])} (ranks {notice['ranks']}) reclaimed"
        if notice["deadline_ms"] is None:
            text += " with no deadline given"
        else:
            left = notice["deadline_ms"] / 1000 - time.time()
            text += f" in {left:.1f} s"
            if self.last_save_s is not None and self.last_save_s >= left:
                text += (f" (warning: the last save took {self.last_save_s:.1f} s, longer than that: this checkpoint may "
                         f"not complete, and a ZeRO-3 save needs the preempted ranks too)")
        return text


def drain_line(cause: str, note: dict, step: int) -> str:
    """The log line of a drain (`note`: a signal's or a notice's) saved for at `step`; `cause`
    says what came (`Notices.situation` for a notice)."""
    if "signal" in note:
        return (f"{cause}: saving a checkpoint at step {step} and exiting (code {EXIT_RESUMABLE}); the same command "
                f"resumes")
    return f"{cause}: saving a checkpoint at step {step}, then training on until the node goes"
