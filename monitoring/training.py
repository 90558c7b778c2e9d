"""Training metrics: what every pretraining worker exports to Prometheus, and how it is found.

Every series carries the labels run, node (host name) and rank. Names follow Prometheus
conventions: a `coatnet_` prefix, base units (seconds, bytes, FLOP/s, ratios 0..1), `_total`
on counters. The worker calls a few cheap methods (a lock and an add each, microseconds a step):

    monitor = start_training_monitor(config, rank, world_size, device, step, epoch)
    monitor.batch(wait_start, batch)         # each micro-batch, after the loader handed it over
    monitor.step(step, epoch, loss, lr, grad_norm)   # each optimizer step
    monitor.log()                            # each log line: throughput, FLOP/s, MFU gauges
    monitor.evaluated(result)  /  monitor.checkpoint_saved(step, seconds)
    monitor.close()                          # linger, stop serving, withdraw the targets

Step time runs from the end of one optimizer step to the end of the next and includes the
wait for data; evaluation and checkpointing are not counted in it (the clock restarts after).
Memory is read when Prometheus scrapes, not during training.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import resource
import socket
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from monitoring.exporter import Exporter, advertised_host, linger, remove_targets, serve, write_targets

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
        self.targets_url: str | None = None
        self.storage_options: dict = {}
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
        # health
        self.corrupt = counter("coatnet_corrupt_samples_total", "Samples skipped because they failed to decode")
        self.checkpoint_seconds = gauge("coatnet_checkpoint_save_seconds", "Duration of the last checkpoint save, all ranks").labels(**labels)
        self.checkpoint_step = gauge("coatnet_checkpoint_last_step", "Step of the newest complete checkpoint").labels(**labels)
        self.checkpoint_time = gauge("coatnet_checkpoint_last_timestamp_seconds", "Unix time the newest complete checkpoint was saved").labels(**labels)
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

    def checkpoint_saved(self, step: int, seconds: float) -> None:
        self.checkpoint_seconds.set(seconds)
        self.checkpoint_step.set(step)
        self.checkpoint_time.set(time.time())
        self.restart_clock()

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
        if self.targets_url:
            try:
                remove_targets(self.targets_url, self.storage_options)
            except Exception as e:
                log.warning("cannot remove the Prometheus target list %s: %s", self.targets_url, e)


class NullMonitor:
    """What the training loop gets with monitoring.enabled false: every call does nothing."""

    def batch(self, wait_start, batch): pass
    def step(self, step, epoch, loss, lr, grad_norm=None): pass
    def log(self): pass
    def evaluated(self, result): pass
    def checkpoint_saved(self, step, seconds): pass
    def computed(self, seconds): pass
    def skipped(self): pass
    def straggler(self, ratio): pass
    def rolled_back(self, count, when): pass
    def resumed(self, step, epoch): pass
    def close(self): pass


# -- wiring inside a Ray Train worker ---------------------------------------------------------


def targets_url(config) -> str:
    folder = config.monitoring.targets_dir or f"{config.storage.url.rstrip('/')}/prometheus"
    return f"{folder.rstrip('/')}/{config.run_name}.json"


def record_group_start(run_url: str, storage_options: dict, job_key: str) -> int:
    """Note that a worker group of this job started; return how many started before it.

    Ray Train restarts the whole group after a failure, in new processes, perhaps on other
    nodes: only storage outlives them. Rank 0 writes one small object per group start, named by
    the Ray session and job, so a rerun of the command (a new job) starts again from zero."""
    from coatnet_scale.storage import url_to_fs

    fs, root = url_to_fs(f"{run_url.rstrip('/')}/monitoring/group_starts", storage_options)
    if "://" not in run_url or run_url.startswith("file://"):
        fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{job_key}-{time.time_ns()}.json", json.dumps({"job": job_key, "time": time.time()}).encode())
    return len(fs.glob(f"{root}/{job_key}-*.json")) - 1


def _ray_identity() -> tuple[int, str, str | None]:
    """(local rank, job key, node IP) of this Ray Train worker."""
    import ray
    import ray.train

    if not ray.is_initialized():  # asking Ray would start a local instance
        raise RuntimeError("not in a Ray worker")
    runtime = ray.get_runtime_context()
    job_key = f"{runtime.get_session_name()}-job{runtime.get_job_id()}"
    return ray.train.get_context().get_local_rank(), job_key, ray.util.get_node_ip_address()


def is_loopback(target: str) -> bool:
    host = target.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return host == "localhost"


def warn_loopback_across_nodes(listed: list[tuple[str, dict]], nodes: set[str]) -> None:
    """A loopback target is reachable only from its own node: with workers on several nodes,
    Prometheus (on one host) would scrape its own host's exporters, or nothing, for the others."""
    loopback = sorted({t.rpartition(":")[0] for t, _ in listed if is_loopback(t)})
    if len(nodes) > 1 and loopback:
        log.warning("monitoring: the workers are on %d nodes but publish loopback addresses (%s), which Prometheus "
                    "can reach only on its own host; set monitoring.address to node (each node's Ray address) "
                    "or 0.0.0.0, on a private network", len(nodes), ", ".join(loopback))


def start_training_monitor(config, rank: int, world_size: int, device, step: int, epoch: int):
    """The worker's monitor, serving /metrics, with every rank's target published by rank 0.

    Collective (one all_gather of a few bytes) when torch.distributed is initialised, so every
    rank must call it. Nothing here stops training: failures log a warning and are skipped."""
    import torch.distributed as dist

    from coatnet_scale.models import count_flops
    from coatnet_scale.storage import storage_options

    m, model = config.monitoring, config.model
    if not m.enabled:
        return NullMonitor()
    labels = {"run": config.run_name, "node": socket.gethostname(), "rank": str(rank)}
    try:  # model FLOPs per training image: forward, and backward at twice the forward
        flops = 3 * count_flops(model.name, model.image_size, model.num_classes)
    except Exception as e:
        log.warning("cannot count %s's FLOPs (%s); FLOP/s and MFU not exported", model.name, e)
        flops = None
    monitor = TrainingMonitor(labels, device, flops, m.peak_tflops * 1e12 if m.peak_tflops else None)
    monitor.linger_seconds = m.linger_seconds
    monitor.storage_options = storage_options(config.storage)
    try:
        local_rank, job_key, node_ip = _ray_identity()
    except Exception:  # outside Ray Train (benchmarks, tests): one process per node
        local_rank, job_key, node_ip = rank, None, None
    port = m.port + local_rank if m.port else 0
    address = (node_ip or "127.0.0.1") if m.address == "node" else m.address
    monitor.exporter = serve(monitor.registry, address, port, f"rank {rank} metrics")
    target = f"{advertised_host(address, node_ip)}:{monitor.exporter.port}" if monitor.exporter else None
    restarts = 0
    if rank == 0 and job_key is not None:
        try:
            restarts = record_group_start(f"{config.storage.url.rstrip('/')}/{config.run_name}", monitor.storage_options, job_key)
        except Exception as e:
            log.warning("cannot record the worker group start in storage (%s); restarts not counted", e)
    mine = (target, labels, restarts, node_ip or labels["node"])
    shared = [mine]
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        shared = [None] * world_size
        dist.all_gather_object(shared, mine)
    monitor.restarts.inc(shared[0][2])
    if step:  # resumed: the checkpoint it resumed from is the newest complete one
        monitor.checkpoint_step.set(step)
    monitor.step_number.set(step)
    monitor.epoch.set(epoch)
    monitor.checkpoint_interval.set(config.checkpoint.every_steps)
    if rank == 0:
        monitor.targets_url = targets_url(config)
        try:
            listed = [(t, lab) for t, lab, _, _ in shared if t]
            write_targets(monitor.targets_url, listed, monitor.storage_options)
            warn_loopback_across_nodes(listed, {node for _, _, _, node in shared})
            print(f"monitoring: {len(listed)} of {world_size} workers' /metrics listed in "
                  f"{monitor.targets_url} (Prometheus file_sd)", flush=True)
        except Exception as e:
            log.warning("cannot write the Prometheus target list %s (%s: %s)", monitor.targets_url, type(e).__name__, e)
            monitor.targets_url = None
    monitor.restart_clock()  # the first step is timed from here, not from the setup above
    return monitor
