"""The engine's side of the tracking sinks (monitoring/tracking.py): TensorBoard and W&B on rank 0.

What outlives the processes lives in the run folder: {storage.url}/{run_name}/monitoring/
tracking.json holds the W&B run id and the last W&B step logged, so a resumed run (new
processes, perhaps another node) continues the same W&B run and never reuses a step; TensorBoard
needs nothing stored (its run is the folder {monitoring.tensorboard}/{run_name}). A run started
from another run's checkpoint (fine-tuning) is a run of its own, linked to that one: W&B config
and notes name the pretraining run and its W&B id, and TensorBoard gets a text note naming it.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
import uuid

from coatnet_scale.config import Config
from coatnet_scale.storage import storage_options, url_to_fs, write_atomic

log = logging.getLogger("coatnet_scale.monitoring")


class Fanout:
    """Both monitors: Prometheus's (or Unmonitored) and the tracker. Attributes set by the loop
    (linger_seconds) go to the first."""

    def __init__(self, *monitors):
        object.__setattr__(self, "monitors", monitors)

    def __getattr__(self, name):
        calls = [getattr(m, name) for m in self.monitors]
        if not all(callable(c) for c in calls):
            return calls[0]
        return lambda *args, **kwargs: [call(*args, **kwargs) for call in calls][0]

    def __setattr__(self, name, value):
        setattr(self.monitors[0], name, value)


def state_url(run_url: str) -> str:
    return f"{run_url.rstrip('/')}/monitoring/tracking.json"


def read_state(run_url: str, options: dict) -> dict:
    fs, path = url_to_fs(state_url(run_url), options)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return {}


def source_run(init_checkpoint: str) -> str:
    """The run folder of a checkpoint URL (a step folder, its checkpoints folder or the run)."""
    url = init_checkpoint.rstrip("/")
    if posixpath.basename(url).startswith("step_"):
        url = posixpath.dirname(url)
    return posixpath.dirname(url) if posixpath.basename(url) == "checkpoints" else url


def lineage(config: Config, options: dict) -> tuple[dict, str | None]:
    """(W&B config entries, a note) naming the run this one started from, if any."""
    init = config.finetune.init_checkpoint
    if not init:
        return {}, None
    if init.endswith(".safetensors"):
        return {"init_checkpoint": init}, f"started from the weights {init}"
    source = source_run(init)
    try:
        wandb_id = read_state(source, options).get("wandb_id")
    except Exception:  # an unreadable source run: the link is the URL alone
        wandb_id = None
    note = f"fine-tuned from {init} (pretraining run {posixpath.basename(source)}" + \
           (f", W&B run {wandb_id})" if wandb_id else ")")
    return {"init_checkpoint": init, "pretraining_run": source, "pretraining_wandb_id": wandb_id}, note


def _tensorboard(config: Config, step: int, options: dict):
    from monitoring.tracking import TensorBoardSink

    root = config.monitoring.tensorboard.rstrip("/")
    if "://" not in root or root.startswith("file://"):
        return TensorBoardSink(os.path.join(root.removeprefix("file://"), config.run_name), step)
    fs, remote = url_to_fs(f"{root}/{config.run_name}", options)
    return TensorBoardSink(tempfile.mkdtemp(prefix="tensorboard-"), step,
                           copy_up=lambda local: fs.put_file(local, f"{remote}/{os.path.basename(local)}"))


def _wandb(config: Config, step: int, run: str, options: dict, links: dict, note: str | None):
    from monitoring.tracking import WandbSink

    w = config.monitoring.wandb
    state = read_state(run, options)
    state.setdefault("wandb_id", uuid.uuid4().hex[:12])
    fs, path = url_to_fs(state_url(run), options)

    def save_step(at: int) -> None:  # before the point goes out, so a crash cannot reuse its step
        write_atomic(fs, path, json.dumps({**state, "wandb_step": at}).encode())

    if "wandb_step" not in state:  # the id is in the run folder before W&B has seen it
        write_atomic(fs, path, json.dumps(state).encode())
    return WandbSink(w.project, w.mode, state["wandb_id"], config.run_name, step, state.get("wandb_step"), save_step,
                     entity=w.entity, folder=w.dir, notes=note,
                     config={"run_name": config.run_name, "model": config.model.name, **links})


def start_tracker(config: Config, rank: int, world_size: int, step: int, flops: float | None = None,
                  peak: float | None = None, recompute_factor: float = 1.0):
    """Rank 0's tracker, or None (another rank, or no sink configured). A sink that cannot start
    logs a warning and is left out: tracking never stops training."""
    m = config.monitoring
    if rank != 0 or (m.tensorboard is None and m.wandb is None):
        return None
    from monitoring.tracking import Tracker

    options = storage_options(config.storage)
    run = f"{config.storage.url.rstrip('/')}/{config.run_name}"
    links, note = lineage(config, options)
    sinks = []
    for name, start, wanted in (("TensorBoard", lambda: _tensorboard(config, step, options), m.tensorboard),
                                ("W&B", lambda: _wandb(config, step, run, options, links, note), m.wandb)):
        if wanted is None:
            continue
        try:
            sinks.append(start())
        except Exception as e:
            log.warning("tracking: cannot start %s (%s: %s); training goes on without it", name, type(e).__name__, e)
    tracker = Tracker(sinks, world_size, step, flops, peak, recompute_factor)
    if note and step == 0:
        tracker.note("source", note)
    if step:
        tracker.note("events", f"resumed from the checkpoint of step {step}")
    print(f"tracking: {', '.join(s.label for s in sinks) or 'no sink'} on rank 0"
          + (f" ({note})" if note else ""), flush=True)
    return tracker


def with_tracking(monitor, config: Config, rank: int, world_size: int, step: int):
    """`monitor`, or it and rank 0's tracker together."""
    figures = [getattr(monitor, name, None) for name in ("flops_per_image", "peak_flops", "recompute_factor")]
    flops, peak, factor = [f if isinstance(f, (int, float)) else None for f in figures]  # Unmonitored has none
    tracker = start_tracker(config, rank, world_size, step, flops, peak, factor or 1.0)
    return monitor if tracker is None else Fanout(monitor, tracker)
