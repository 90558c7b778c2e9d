"""Tracking sinks beside Prometheus: TensorBoard event files and Weights & Biases runs.

Plain values in, nothing of the trainer imported (the engine's side is
coatnet_scale/engine/tracking.py). Rank 0 only. `Tracker` takes the calls the training loop
makes on its monitor (batch, step, log, evaluated, checkpoint_saved, ...) and writes, at each
log line, the figures the Grafana dashboard shows to every sink it was given:

    train/loss, train/lr, train/grad_norm, train/epoch
    perf/images_per_second (rank 0's rate times the workers), perf/step_seconds,
    perf/data_wait_fraction, perf/mfu, perf/hfu (with monitoring.peak_tflops)
    eval/top1, eval/top5 (eval/ema_top1, eval/ema_top5 with an EMA)
    checkpoint/blocked_seconds, checkpoint/upload_seconds, checkpoint/step
    health/skipped_steps, health/rollbacks

Runs restart: a new worker group resumes from a checkpoint, and a rollback starts again from
one in the same processes. Either way some logged steps are done again. TensorBoard is told
with a purge step (its reader drops the superseded points, so one line remains); W&B's step
must only grow, so a W&B point is logged at "steps run" (the train step plus every step done
again so far) with the train step as the metric train/step: its default x-axis then shows the
run as it happened, one line, the re-done stretch after the abandoned one.
"""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("coatnet_scale.monitoring")


class SinkMissing(RuntimeError):
    """A sink was asked for but its package is not installed."""


def require(package: str, extra: str) -> None:
    """A one-line error when `package` is not importable (checked before anything starts)."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise SinkMissing(f"needs the {package} package: pip install 'coatnet_scale[{extra}]'")


class TensorBoardSink:
    """Event files in `{root}/{run}`: one run of TensorBoard's, continued by every restart. A
    restart at step s writes with purge_step s + 1, so TensorBoard drops what the abandoned
    attempt logged after s. A URL (s3://, gs://) is written locally and each file copied up at
    every flush; TensorBoard reads the folder's files in name order, oldest first."""

    label = "TensorBoard"

    def __init__(self, folder: str, step: int, copy_up=None):
        """`folder`: the run's local folder; with `copy_up(local_path)`, a local staging folder
        whose files copy_up stores beside the others of the run."""
        require("tensorboard", "tensorboard")
        self.folder, self.copy_up = folder, copy_up
        self.writer = None
        self.restart(step)

    def restart(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is not None:
            self.writer.close()
        self.writer = SummaryWriter(self.folder, purge_step=step + 1 if step else None, flush_secs=3600)

    def scalars(self, step: int, figures: dict) -> None:
        for name, value in figures.items():
            self.writer.add_scalar(name, value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, step)

    def commit(self) -> None:
        pass  # written as they come

    def flush(self) -> None:
        self.writer.flush()
        if self.copy_up is not None:
            for name in os.listdir(self.folder):
                self.copy_up(os.path.join(self.folder, name))

    def close(self) -> None:
        self.flush()
        self.writer.close()


class WandbSink:
    """One W&B run, `run_id`, resumed by every restart. `steps_run`: the W&B step of the last
    point already logged (None: a new run); `save_step(n)` is called before a point goes out at
    W&B step n, so a restart never reuses a step (W&B drops a point whose step went back).

    A point is held here until nothing more comes for its step (the next batch, a restart, the
    end), then committed: W&B's own client holds an uncommitted point in memory, and a killed
    worker would lose it. Its service writes the .wandb log every second, not every 15 (0.31's
    default), for the same reason."""

    label = "W&B"

    def __init__(self, project: str, mode: str, run_id: str, name: str, step: int, steps_run: int | None,
                 save_step, entity: str | None = None, folder: str | None = None, config: dict | None = None,
                 notes: str | None = None):
        require("wandb", "wandb")
        import wandb

        if folder:
            os.makedirs(folder, exist_ok=True)
        settings = wandb.Settings(silent=True, x_transaction_log_flush_interval=1.0)
        self.run = wandb.init(project=project, entity=entity, id=run_id, name=name, mode=mode, dir=folder,
                              resume="allow", config=config, notes=notes, settings=settings)
        self.run.define_metric("train/step", summary="max")
        self.save_step = save_step
        self.last = steps_run  # the W&B step of the last point given out (saved), committed or held
        self.offset = 0 if steps_run is None else steps_run + 1 - step  # steps run = train step + offset
        self.held: dict | None = None

    def restart(self, step: int) -> None:
        self.commit()
        if self.last is not None:
            self.offset = self.last + 1 - step

    def scalars(self, step: int, figures: dict) -> None:
        at = step + self.offset
        if self.held is not None and at == self.last:
            self.held.update(figures)
            return
        self.commit()
        if self.last is not None and at <= self.last:  # more for a step already committed (a last eval)
            self.offset += self.last + 1 - at
            at = self.last + 1
        self.save_step(at)
        self.last, self.held = at, {"train/step": step, **figures}

    def text(self, step: int, tag: str, text: str) -> None:
        self.scalars(step, {tag: text})

    def commit(self) -> None:
        if self.held is not None:
            self.run.log(self.held, step=self.last, commit=True)
            self.held = None

    def flush(self) -> None:
        pass  # held until its step is over (commit)

    def close(self) -> None:
        self.commit()
        self.run.finish()


class Tracker:
    """The monitor calls of rank 0, turned into figures for the sinks at each log line."""

    def __init__(self, sinks: list, world_size: int, step: int, flops_per_image: float | None = None,
                 peak_flops: float | None = None, recompute_factor: float = 1.0):
        self.sinks, self.world_size = sinks, world_size
        self.flops_per_image, self.peak_flops, self.recompute_factor = flops_per_image, peak_flops, recompute_factor
        self.step_number, self.epoch = step, 0
        self.latest: dict = {}  # figures waiting for the next log line
        self.skipped_steps = 0
        self._written = False
        self._clock = time.monotonic()
        self._wait = self._window_wait = self._window_seconds = 0.0
        self._images = self._window_images = self._window_steps = 0

    def _each(self, what: str, *args) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, what)(*args)
            except Exception as e:  # a sink never stops training; it stops writing, loudly
                log.warning("tracking: %s failed in %s (%s: %s); it writes no more", type(sink).__name__, what,
                            type(e).__name__, e)
                self.sinks.remove(sink)

    def note(self, tag: str, text: str) -> None:
        self._each("text", self.step_number, tag, text)
        self._each("flush")
        self._written = True

    # -- the monitor's calls ---------------------------------------------------------------

    def batch(self, wait_start: float, batch: dict) -> None:
        if self._written:  # the loop is on to the next step: nothing more comes for the last point
            self._each("commit")
            self._written = False
        self._wait += time.monotonic() - wait_start
        self._images += len(batch["labels"])

    def step(self, step: int, epoch: int, loss: float, lr: float, grad_norm=None) -> None:
        now = time.monotonic()
        self._window_seconds += now - self._clock
        self._clock = now
        self._window_wait += self._wait
        self._window_images += self._images
        self._window_steps += 1
        self._wait, self._images = 0.0, 0
        self.step_number, self.epoch = step, epoch
        self.latest.update({"train/loss": loss, "train/lr": lr, "train/epoch": epoch})
        if grad_norm is not None:
            self.latest["train/grad_norm"] = float(grad_norm)

    def log(self) -> None:
        if self._window_seconds > 0:
            rate = self._window_images / self._window_seconds
            self.latest.update({"perf/images_per_second": rate * self.world_size,
                                "perf/step_seconds": self._window_seconds / self._window_steps,
                                "perf/data_wait_fraction": self._window_wait / self._window_seconds})
            if self.flops_per_image and self.peak_flops:
                self.latest["perf/mfu"] = rate * self.flops_per_image / self.peak_flops
                self.latest["perf/hfu"] = self.latest["perf/mfu"] * self.recompute_factor
        self.latest["health/skipped_steps"] = self.skipped_steps
        self._write()
        self._window_images, self._window_seconds, self._window_wait, self._window_steps = 0, 0.0, 0.0, 0

    def _write(self) -> None:
        figures = {k: float(v) for k, v in self.latest.items()}
        self.latest = {}
        self._each("scalars", self.step_number, figures)
        self._each("flush")
        self._written = True

    def restart_clock(self) -> None:
        self._clock = time.monotonic()

    def evaluated(self, result: dict) -> None:
        self.latest.update({f"eval/{k}": v for k, v in result.items() if k.endswith(("top1", "top5"))})
        self._write()
        self.restart_clock()

    def checkpoint_saved(self, blocked_seconds: float, in_flight: bool) -> None:
        self.latest["checkpoint/blocked_seconds"] = blocked_seconds
        self.restart_clock()

    def checkpoint_complete(self, step: int, upload_seconds: float) -> None:
        self.latest.update({"checkpoint/upload_seconds": upload_seconds, "checkpoint/step": step})

    def skipped(self) -> None:
        self.skipped_steps += 1

    def rolled_back(self, count: int, when: float) -> None:
        self.latest["health/rollbacks"] = count

    def resumed(self, step: int, epoch: int) -> None:
        """A rollback: the loop starts again from the checkpoint at `step` in these processes."""
        self.step_number, self.epoch = step, epoch
        self._each("restart", step)
        self.note("events", f"rolled back: training again from the checkpoint of step {step}")
        self.restart_clock()

    def close(self) -> None:
        if self.latest:
            self._write()
        self._each("close")
        self.sinks = []

    def __getattr__(self, name):  # the monitor's other calls (preempted, computed, straggler, ...)
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None
