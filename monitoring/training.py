"""Training metrics: what every pretraining worker exports to Prometheus.

Plain values in, metrics out: nothing here imports the trainer. The engine builds the monitor
from its config and publishes where it serves (coatnet_scale/engine/monitor.py).

Every series carries the labels run, node (host name) and rank. Names follow Prometheus
conventions: a `coatnet_` prefix, base units (seconds, bytes, FLOP/s, ratios 0..1), `_total`
on counters. The worker calls a few cheap methods (a lock and an add each, microseconds a step):

    monitor = start_training_monitor(config, rank, world_size, device, step, epoch)   # the engine's
    monitor.batch(wait_start, batch)         # each micro-batch, after the loader handed it over
    monitor.step(step, epoch, loss, lr, grad_norm)   # each optimizer step
    monitor.log()                            # each log line: throughput, FLOP/s, MFU gauges
    monitor.evaluated(result)
    monitor.checkpoint_saved(blocked_seconds, in_flight)   # the loop staged a save (upload maybe still going)
    monitor.checkpoint_complete(step, upload_seconds)      # its marker is written: it counts
    monitor.checkpoint_failed()              # a save dropped on every rank: a rank could not store its files
    monitor.preempted()                      # a preemption notice or signal reached this worker
    monitor.close()                          # linger, stop serving, withdraw the targets

Step time runs from the end of one optimizer step to the end of the next and includes the
wait for data; evaluation and checkpointing are not counted in it (the clock restarts after).
Memory is read when Prometheus scrapes, not during training.
"""
from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from monitoring.exporter import Exporter, linger

log = logging.getLogger("coatnet_scale.monitoring")

LABELS = ("run", "node", "rank")
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, float("inf"))
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
    return max(peak, rss_bytes())  # the kernel updates its peak lazily


class TrainingMonitor:
    """The metrics of one worker, in a registry of its own (served by `serve`)."""

    def __init__(self, labels: dict, device=None, flops_per_image: float | None = None, peak_flops: float | None = None):
        self.labels = labels
        self.flops_per_image, self.peak_flops = flops_per_image, peak_flops
        self.exporter: Exporter | None = None
        self.withdraw_targets: Callable[[], None] | None = None  # removes this run's scrape targets
        self.linger_seconds = 0.0
        self.registry = r = CollectorRegistry()

        def gauge(name, doc, extra=()):
            return Gauge(name, doc, LABELS + extra, registry=r)

        def counter(name, doc):
            return Counter(name, doc, LABELS, registry=r).labels(**labels)

        # throughput
        self.images = counter("coatnet_images_total", "Training images this worker has processed")
        self.steps = counter("coatnet_steps_total", "Optimizer steps this worker has taken")
        self.step_seconds = Histogram("coatnet_step_seconds", "Wall time of one optimizer step, data wait included",
                                      LABELS, buckets=STEP_BUCKETS, registry=r).labels(**labels)
        self.data_wait = Histogram("coatnet_data_wait_seconds", "Time one optimizer step spent waiting for batches",
                                   LABELS, buckets=WAIT_BUCKETS, registry=r).labels(**labels)
        self.images_per_second = gauge("coatnet_images_per_second", "This worker's training images per second over the last log window").labels(**labels)
        # learning
        self.loss = gauge("coatnet_loss", "Training loss of the last optimizer step (this worker's batches)").labels(**labels)
        self.learning_rate = gauge("coatnet_learning_rate", "Learning rate of the last optimizer step").labels(**labels)
        self.gradient_norm = gauge("coatnet_gradient_norm", "Global L2 norm of the gradients before clipping").labels(**labels)
        # weights="raw", and "ema" when the run keeps an exponential moving average of them
        self.top1 = gauge("coatnet_validation_top1_ratio", "Top-1 accuracy on the whole validation set", ("weights",))
        self.top5 = gauge("coatnet_validation_top5_ratio", "Top-5 accuracy on the whole validation set", ("weights",))
        self.epoch = gauge("coatnet_epoch", "Current epoch of the training data (0-based)").labels(**labels)
        self.step_number = gauge("coatnet_step", "Optimizer steps completed in the run (resumes continue the count)").labels(**labels)
        # efficiency
        self.flops = gauge("coatnet_model_flops_per_second", "Achieved model FLOP/s of this worker (3x forward FLOPs per image)").labels(**labels)
        self.mfu = gauge("coatnet_mfu_ratio", "Model FLOPs utilisation: achieved model FLOP/s over the device's peak").labels(**labels)
        self.hfu = gauge("coatnet_hardware_flops_utilisation_ratio", "Hardware FLOP utilisation: MFU with the recomputed "
                         "forward of activation checkpointing counted").labels(**labels)
        self.recompute_factor = 1.0  # hardware FLOPs over model FLOPs: 4/3 when every block recomputes its forward
        # health
        self.corrupt = counter("coatnet_corrupt_samples_total", "Samples skipped because they failed to decode")
        self.checkpoint_blocked = gauge("coatnet_checkpoint_blocked_seconds", "Seconds the training loop blocked for the "
                                        "last checkpoint save (staging; with the upload too when it is not in the background)").labels(**labels)
        self.checkpoint_upload = gauge("coatnet_checkpoint_upload_seconds", "Seconds this rank took to hash and store its "
                                       "files of the newest complete checkpoint (upload, or fsync on local storage)").labels(**labels)
        self.checkpoint_uploads = gauge("coatnet_checkpoint_uploads_in_flight", "Checkpoint saves staged whose upload or "
                                        "marker is not done yet (0 or 1)").labels(**labels)
        self.checkpoint_step = gauge("coatnet_checkpoint_last_step", "Step of the newest complete (marked) checkpoint").labels(**labels)
        self.checkpoint_time = gauge("coatnet_checkpoint_last_timestamp_seconds", "Unix time the newest complete (marked) checkpoint was written").labels(**labels)
        self.checkpoint_failures = counter("coatnet_checkpoint_failed_saves_total", "Checkpoint saves dropped because a "
                                           "rank could not store its files (every rank counts each; no marker written)")
        self.preemptions = counter("coatnet_preemption_notices_total", "Preemption notices (Ray) and signals (SIGTERM, SIGUSR1) this worker acted on")
        self.restarts = counter("coatnet_worker_group_restarts_total", "Times Ray Train restarted the worker group in this job")
        # run health (coatnet_scale/engine/health.py)
        self.skipped_steps = counter("coatnet_skipped_steps_total", "Optimizer steps DeepSpeed skipped (non-finite gradient norm)")
        self.rollbacks = gauge("coatnet_rollbacks", "Rollbacks the run has had (all jobs; health/ records in storage)").labels(**labels)
        self.rollback_time = gauge("coatnet_last_rollback_timestamp_seconds", "Unix time of the run's newest rollback").labels(**labels)
        self.compute_seconds = gauge("coatnet_compute_seconds", "Compute time of the last step: its wall time less data wait").labels(**labels)
        self.last_step_time = gauge("coatnet_last_step_timestamp_seconds", "Unix time the last optimizer step ended").labels(**labels)
        self.straggler_ratio = gauge("coatnet_straggler_ratio", "This rank's mean compute time over the group's median (last check)").labels(**labels)
        self.checkpoint_interval = gauge("coatnet_checkpoint_interval_steps", "Steps between checkpoints (checkpoint.every_steps)").labels(**labels)
        self._memory(device)

        self._clock = time.monotonic()
        self._wait, self._batch_images, self._batch_corrupt = 0.0, 0, 0
        self._window_images, self._window_seconds = 0, 0.0

    def _memory(self, device) -> None:
        """Device memory on a GPU, the process's resident memory on a CPU; read at scrape time."""
        import torch

        kind = "cpu" if device is None or device.type == "cpu" else f"{device.type}:{device.index}"
        allocated = Gauge("coatnet_device_memory_allocated_bytes", "Memory allocated now: tensors on a GPU, resident set on a CPU",
                          LABELS + ("device",), registry=self.registry).labels(**self.labels, device=kind)
        peak = Gauge("coatnet_device_memory_peak_bytes", "Peak of coatnet_device_memory_allocated_bytes since the worker started",
                     LABELS + ("device",), registry=self.registry).labels(**self.labels, device=kind)
        if kind == "cpu":
            allocated.set_function(rss_bytes)
            peak.set_function(peak_rss_bytes)
        else:
            allocated.set_function(lambda: torch.cuda.memory_allocated(device))
            peak.set_function(lambda: torch.cuda.max_memory_allocated(device))

    # -- called by the training loop -----------------------------------------------------

    def batch(self, wait_start: float, batch: dict) -> None:
        self._wait += time.monotonic() - wait_start
        self._batch_images += len(batch["labels"])
        self._batch_corrupt += int(batch.get("corrupt", 0))

    def step(self, step: int, epoch: int, loss: float, lr: float, grad_norm=None) -> None:
        now = time.monotonic()
        seconds, self._clock = now - self._clock, now
        self.step_seconds.observe(seconds)
        self.data_wait.observe(self._wait)
        self.steps.inc()
        self.images.inc(self._batch_images)
        if self._batch_corrupt:
            self.corrupt.inc(self._batch_corrupt)
        self._window_images += self._batch_images
        self._window_seconds += seconds
        self._wait, self._batch_images, self._batch_corrupt = 0.0, 0, 0
        self.step_number.set(step)
        self.epoch.set(epoch)
        self.loss.set(loss)
        self.learning_rate.set(lr)
        if grad_norm is not None:  # DeepSpeed has none before its first step
            self.gradient_norm.set(float(grad_norm))

    def log(self) -> None:
        """Throughput over the steps since the last call (evaluation and checkpoints excluded)."""
        if self._window_seconds > 0:
            rate = self._window_images / self._window_seconds
            self.images_per_second.set(rate)
            if self.flops_per_image:
                self.flops.set(rate * self.flops_per_image)
                if self.peak_flops:
                    self.mfu.set(rate * self.flops_per_image / self.peak_flops)
                    self.hfu.set(rate * self.flops_per_image * self.recompute_factor / self.peak_flops)
        self._window_images, self._window_seconds = 0, 0.0

    def restart_clock(self) -> None:
        self._clock = time.monotonic()

    def evaluated(self, result: dict) -> None:
        """`result`: top1, top5 and, with an EMA, ema_top1, ema_top5 (engine.worker.evaluate_with_ema)."""
        for weights, prefix in (("raw", ""), ("ema", "ema_")):
            if f"{prefix}top1" in result:
                self.top1.labels(**self.labels, weights=weights).set(result[f"{prefix}top1"])
                self.top5.labels(**self.labels, weights=weights).set(result[f"{prefix}top5"])
        self.restart_clock()

    def checkpoint_failed(self) -> None:
        """A save was dropped on every rank: some rank's upload failed. The next save tries again."""
        self.checkpoint_failures.inc()
        self.checkpoint_uploads.set(0)

    def checkpoint_saved(self, blocked_seconds: float, in_flight: bool) -> None:
        """The loop is back from a save: it blocked this long; its upload may go on."""
        self.checkpoint_blocked.set(blocked_seconds)
        self.checkpoint_uploads.set(int(in_flight))
        self.restart_clock()

    def checkpoint_complete(self, step: int, upload_seconds: float) -> None:
        """A checkpoint's marker is written: only now does it count as the newest."""
        self.checkpoint_upload.set(upload_seconds)
        self.checkpoint_uploads.set(0)
        self.checkpoint_step.set(step)
        self.checkpoint_time.set(time.time())

    def preempted(self) -> None:
        self.preemptions.inc()

    def computed(self, seconds: float) -> None:
        self.compute_seconds.set(seconds)
        self.last_step_time.set(time.time())

    def skipped(self) -> None:
        self.skipped_steps.inc()

    def straggler(self, ratio: float) -> None:
        self.straggler_ratio.set(ratio)

    def rolled_back(self, count: int, when: float) -> None:
        self.rollbacks.set(count)
        self.rollback_time.set(when)

    def resumed(self, step: int, epoch: int) -> None:
        """The loop starts again from a checkpoint in the same processes (a rollback)."""
        self.checkpoint_step.set(step)
        self.step_number.set(step)
        self.epoch.set(epoch)
        self.restart_clock()

    def close(self) -> None:
        """After the last step: keep serving `linger_seconds`, then stop and withdraw the targets.
        Every rank lingers, exporter or not, so rank 0 withdraws the list only after the others."""
        if self.linger_seconds:
            linger(self.linger_seconds)
        if self.exporter is not None:
            self.exporter.stop()
            self.exporter = None
        if self.withdraw_targets is not None:
            try:
                self.withdraw_targets()
            except Exception as e:
                log.warning("cannot remove the Prometheus target list: %s", e)
