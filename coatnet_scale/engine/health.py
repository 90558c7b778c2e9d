"""Run health: every step the ranks agree on how it went; trouble rolls the run back.

Each step ends with one all-reduce of a few numbers per rank (the loop's only collective of its
own; the log line's sums ride on it): the loss, whether it is finite, whether the global
gradient norm is finite, whether DeepSpeed applied the step (ZeRO-3 skips a step whose gradient
norm is not finite, and only counts it), the images and corrupt samples read, and each rank's
compute time in its own slot, and whether a stop signal reached it (engine/interrupt.py). So
every rank reaches the same verdict at the same step. The same vector counts the ranks whose
background checkpoint upload is stored, and those whose upload failed (engine/checkpoint.py),
so the marker waits on no collective of its own and one rank's storage error reaches every
rank at the same step. The verdict is an `Agreed` record; docs/engine.md's table says who acts
on each of its fields.

A skipped step is counted (`coatnet_skipped_steps_total`) and logged. A rollback comes on a
non-finite loss, on `train.max_skipped_steps` skipped steps in a row, or on a spike: a loss
above the rolling mean + `train.spike_sigma` standard deviations of the last `train.spike_window`
applied steps (64 at least before it judges). The attempt ends (`Rollback`) and the loop starts
again in the same processes from the newest complete checkpoint, which is one written before
the trouble began: no checkpoint is written while steps are being skipped, and pruning keeps the
newest. The new attempt skips the batches of the steps from that checkpoint through the trouble
step, plus `train.spike_skip_batches` steps' batches (PaLM's remedy: the spikes come from data
and model state together).

Nothing is lost silently: rank 0 writes each rollback to {storage.url}/{run_name}/health/
rollback-*.json (reason, trouble step, checkpoint, steps skipped), and the attempt that skips
adds which batches of which epoch it passed over, with the loader's plan, so
`python -m coatnet_scale.data keys --skipped RUN_URL` lists the samples. That record is the
skip: a later attempt from the same checkpoint, by a group of any shape (a resize), reads on
from where it ended in the data order, so the samples listed are the samples skipped. After
`train.max_rollbacks` rollbacks to one checkpoint the next trouble stops the run: the launcher
prints `pretrain: RUN stopped: …` and exits 78 (engine/failures.py: it stays stopped). A
rollback never skips more than one epoch's batches: a wider span (a checkpoint far behind the
trouble) is cut to one epoch, and the record says so (`skip_steps_requested`).

Stragglers: every `monitoring.straggler_every_steps` rank 0 compares the ranks' mean compute
time (a step's wall time less its data wait, before this agreement) and logs
`straggler: rank R (node N) compute X s vs median Y s (Z×)` at `monitoring.straggler_ratio`.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from collections import deque
from dataclasses import astuple, dataclass

import torch
import torch.distributed as dist
from coatnet_scale.data.plan import Phase
from coatnet_scale.engine import collectives
from coatnet_scale.storage import url_to_fs, write_atomic

# loss, loss not finite, grad norm not finite, step not applied, corrupt samples, images,
# upload stored, upload failed, signalled; then each rank's compute time
FLAGS = 9


@dataclass(frozen=True)
class Agreed:
    """What the group agreed after one step (one all-reduce): every rank holds the same."""

    step: int
    loss: float  # the group's mean; nan when not finite on a rank
    images: int
    corrupt: int
    trouble: str | None  # why the run rolls back (or stops, past train.max_rollbacks); None: healthy
    upload: str  # the save in flight: "none", "pending", "stored" (on every rank) or "failed" (on one at least)
    signalled: int  # ranks that caught a stop signal


def upload_outcome(stored: int, failed: int, in_flight: bool, world_size: int) -> str:
    if failed:
        return "failed"
    if stored == world_size:
        return "stored"
    return "pending" if in_flight else "none"


class Rollback(Exception):
    """This attempt ends; the loop resumes from the newest complete checkpoint."""


def health_url(run_url: str) -> str:
    return f"{run_url.rstrip('/')}/health"


def read_rollbacks(run_url: str, storage_options: dict) -> list[dict]:
    """Every rollback record of the run, oldest first, each with its "name"."""
    fs, root = url_to_fs(health_url(run_url), storage_options)
    records = []
    for path in sorted(fs.glob(f"{root}/rollback-*.json")):
        records.append({**json.loads(fs.cat_file(path)), "name": path.rsplit("/", 1)[-1]})
    return records


class Health:
    def __init__(self, config, run_url: str, storage_options: dict, rank: int, world_size: int, nodes: list[str],
                 device: torch.device, checkpoint: str | None, checkpoint_step: int, records: list[dict]):
        t, m = config.train, config.monitoring
        self.train, self.monitoring = t, m
        self.rank, self.world_size, self.nodes, self.device, self.monitor = rank, world_size, nodes, device, None
        self.url = health_url(run_url)
        self.fs, self.root = url_to_fs(self.url, storage_options)
        self.checkpoint_url = f"{run_url.rstrip('/')}/checkpoints"
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step  # the newest complete one
        self.rollbacks = len([r for r in records if r["checkpoint"] == checkpoint])  # to it, before this attempt
        self.losses: deque[float] = deque(maxlen=t.spike_window)
        self.skipped_in_a_row, self.first_skipped = 0, None
        self.compute = [0.0] * world_size  # each rank's, summed over the straggler window
        self.window = 0
        self.records = records

    def started(self, monitor) -> None:
        """The attempt's monitor, told how many rollbacks the run has had."""
        self.monitor = monitor
        if self.records:
            monitor.rolled_back(len(self.records), self.records[-1]["time"])

    @property
    def healthy(self) -> bool:
        """False while steps are being skipped: no checkpoint is written then."""
        return self.skipped_in_a_row == 0

    def agree(self, step: int, loss: float, grad_norm, applied: bool, corrupt: int, images: int,
              compute: float, upload: str = "none", signalled: bool = False) -> Agreed:
        """Collective, once per step. `upload`: this rank's part of the save in flight ("none",
        "pending", "stored", "failed"). Returns the group's verdict; `trouble` says the run must
        roll back (`roll_back` does it)."""
        grad_finite = grad_norm is None or math.isfinite(float(grad_norm))
        slots = [0.0] * self.world_size
        slots[self.rank] = compute
        values = [loss if math.isfinite(loss) else 0.0, not math.isfinite(loss), not grad_finite, not applied, corrupt,
                  images, upload == "stored", upload == "failed", signalled, *slots]
        agreed = collectives.all_reduce(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()
        self.monitor.computed(compute)
        self.compute = [total + seconds for total, seconds in zip(self.compute, agreed[FLAGS:])]
        self.window += 1
        if self.window >= self.monitoring.straggler_every_steps:
            self._stragglers(step)
        loss_mean = agreed[0] / self.world_size
        return Agreed(step, loss_mean if not agreed[1] else math.nan, int(agreed[5]), int(agreed[4]),
                      self._judge(step, agreed, loss_mean),
                      upload_outcome(int(agreed[6]), int(agreed[7]), upload != "none", self.world_size), int(agreed[8]))

    def _judge(self, step: int, agreed: list[float], loss_mean: float) -> str | None:
        """Why this step calls for a rollback, or None; counts skipped steps and the loss window."""
        if agreed[1]:
            return f"the loss is not finite on {int(agreed[1])} rank(s)"
        if agreed[2] or agreed[3]:
            self.skipped_in_a_row += 1
            self.first_skipped = self.first_skipped or step
            self.monitor.skipped()
            if self.rank == 0:
                why = "the gradient norm is not finite" if agreed[2] else "DeepSpeed did not apply it"
                print(f"step {step} skipped: {why}; {self.skipped_in_a_row} in a row "
                      f"(train.max_skipped_steps {self.train.max_skipped_steps})", flush=True)
            if self.skipped_in_a_row >= self.train.max_skipped_steps:
                return f"{self.skipped_in_a_row} steps in a row skipped (non-finite gradients)"
            return None
        self.skipped_in_a_row, self.first_skipped = 0, None
        spike = self._spike(loss_mean)
        if spike is None:
            self.losses.append(loss_mean)
        return spike

    def _spike(self, loss: float) -> str | None:
        t = self.train
        if not t.spike_sigma or len(self.losses) < 64:
            return None
        mean = math.fsum(self.losses) / len(self.losses)
        sigma = math.sqrt(math.fsum((x - mean) ** 2 for x in self.losses) / len(self.losses))
        if loss > mean + t.spike_sigma * sigma:
            return (f"loss spike: {loss:.4g} above the mean {mean:.4g} + {t.spike_sigma:g} sigma ({sigma:.3g}) "
                    f"of the last {len(self.losses)} steps")
        return None

    def _stragglers(self, step: int) -> None:
        means = [total / self.window for total in self.compute]
        median = statistics.median(means)
        self.compute = [0.0] * self.world_size
        self.window = 0
        if median <= 0:
            return
        self.monitor.straggler(means[self.rank] / median)
        if self.rank != 0:
            return
        for rank, seconds in enumerate(means):
            if seconds / median >= self.monitoring.straggler_ratio:
                print(f"straggler: rank {rank} (node {self.nodes[rank]}) compute {seconds:.3f} s vs median "
                      f"{median:.3f} s ({seconds / median:.2f}×) over the steps to {step}", flush=True)

    def saved(self, step: int, tag: str) -> None:
        """A checkpoint was written: rollbacks now go to it, and start counting again."""
        self.checkpoint, self.checkpoint_step, self.rollbacks = tag, step, 0

    def roll_back(self, step: int, reason: str) -> str:
        """Roll back (raises Rollback) or, after max_rollbacks to one checkpoint, return why the
        run stops."""
        t = self.train
        good = f"{self.checkpoint_url}/{self.checkpoint}" if self.checkpoint else "none (the run has no checkpoint yet)"
        if self.rollbacks >= t.max_rollbacks:
            return (f"step {step}: {reason}; after {self.rollbacks} rollback(s) to the last good checkpoint, "
                    f"{good} (train.max_rollbacks {t.max_rollbacks})")
        skip = step - self.checkpoint_step + t.spike_skip_batches
        if self.rank == 0:
            record = {"time": time.time(), "step": step, "first_bad_step": self.first_skipped or step,
                      "reason": reason, "checkpoint": self.checkpoint, "checkpoint_step": self.checkpoint_step,
                      "skip_steps": skip}
            self._write(f"rollback-{time.time_ns():020d}.json", record)
            print(f"rollback: step {step}: {reason}; resuming from {good}, skipping the batches of {skip} steps "
                  f"(record in {self.url}/)", flush=True)
        if self.world_size > 1:
            dist.barrier()  # the record exists before any rank looks for it
        raise Rollback(reason)

    def _write(self, name: str, record: dict) -> None:
        write_atomic(self.fs, f"{self.root}/{name}", json.dumps(record, indent=1).encode())  # makes the folder

    def skip(self, loader, group: dict, micro_batches_per_step: int, epoch: int,
             batch_in_epoch: int, phases: tuple) -> tuple[int, int, tuple]:
        """Pass over the batches the rollbacks to this attempt's checkpoint asked to skip, in
        their order, at most one epoch's (`skip_steps_requested` in the record when cut). The
        first attempt to skip a record's steps writes which batches of which epoch those were
        (rank 0, in its data group's terms: samples, not steps); every later attempt, whatever its
        group's shape, reads on from where that skip ended in the data order, so a resize in
        between skips the same samples. Returns the new (epoch, batch_in_epoch, phases)."""
        for record in self.records:
            if record["checkpoint"] != self.checkpoint:
                continue
            if record.get("skipped"):
                end = record["skipped"][-1]
                epoch, batch_in_epoch, phases = loader.continue_from(
                    end["epoch"], end["to_batch"], tuple(Phase(*p) for p in end["phases"]),
                    [end["world_size"], end["num_workers"], end["batch_size"]])
                continue
            steps = min(record["skip_steps"], max(1, loader.batches_in(epoch, ()) // micro_batches_per_step))
            spans, (epoch, batch_in_epoch, phases) = _passed_over(loader, group, steps * micro_batches_per_step,
                                                                  epoch, batch_in_epoch, phases)
            if self.rank == 0:
                name = record["name"]
                cut = {"skip_steps": steps, "skip_steps_requested": record["skip_steps"]} \
                    if steps < record["skip_steps"] else {}
                self._write(name, {**{k: v for k, v in record.items() if k != "name"}, **cut, "skipped": spans})
                print(f"rollback: skipped {steps} steps' batches ({name})"
                      + (f", not the {record['skip_steps']} asked for: at most one epoch's" if cut else "") + ": "
                      + "; ".join(f"epoch {s['epoch']} batches {s['from_batch']}-{s['to_batch'] - 1} of each rank"
                                  for s in spans), flush=True)
        return epoch, batch_in_epoch, phases


def _passed_over(loader, group: dict, batches: int, epoch: int, batch_in_epoch: int,
                 phases: tuple) -> tuple[list[dict], tuple[int, int, tuple]]:
    """The spans of `batches` batches read on from (epoch, batch_in_epoch, phases), and where
    reading then stands."""
    spans = []
    while batches:
        end = min(loader.batches_in(epoch, phases), batch_in_epoch + batches)
        spans.append({"epoch": epoch, "phases": [list(astuple(p)) for p in phases], "from_batch": batch_in_epoch,
                      "to_batch": end, **group})
        batches -= end - batch_in_epoch
        batch_in_epoch = end
        if batch_in_epoch >= loader.batches_in(epoch, phases):
            epoch, batch_in_epoch, phases = epoch + 1, 0, ()
    return spans, (epoch, batch_in_epoch, phases)
