"""The worker's monitor: the one seam between the engine and `monitoring/`.

`monitoring/` knows nothing of the trainer: its TrainingMonitor takes labels, FLOPs per image
and a peak. Here the engine builds it from the config, serves it on the configured address,
records worker-group starts in storage (restarts outlive the processes that count them) and
publishes every rank's scrape target for Prometheus (file_sd), which rank 0 withdraws when the
run ends. With monitoring off the loop gets `Unmonitored`, and the Prometheus client is never
imported. Rank 0 adds the TensorBoard and W&B sinks when configured (engine/tracking.py),
with or without Prometheus.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import socket
import time

from coatnet_scale.config import Config
from coatnet_scale.engine.tracking import with_tracking
from coatnet_scale.models import count_flops
from coatnet_scale.storage import storage_options, url_to_fs, write_atomic

log = logging.getLogger("coatnet_scale.monitoring")


class Unmonitored:
    """Every call the loop makes on a monitor, doing nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def targets_url(config: Config) -> str:
    folder = config.monitoring.targets_dir or f"{config.storage.url.rstrip('/')}/prometheus"
    return f"{folder.rstrip('/')}/{config.run_name}.json"


def write_targets(url: str, targets: list[tuple[str, dict]], options: dict | None = None) -> None:
    """Publish the target list so Prometheus never reads a half-written file: temp file +
    rename on a filesystem, one PUT on an object store."""
    from monitoring.exporter import file_sd

    fs, path = url_to_fs(url, options or {})
    write_atomic(fs, path, file_sd(targets))


def remove_targets(url: str, options: dict | None = None) -> None:
    fs, path = url_to_fs(url, options or {})
    if fs.exists(path):
        fs.rm(path)


def record_group_start(run_url: str, options: dict, job_key: str) -> int:
    """Note that a worker group of this job started; return how many started before it.

    Ray Train restarts the whole group after a failure, in new processes, perhaps on other
    nodes: only storage outlives them. Rank 0 writes one small object per group start, named by
    the Ray session and job, so a rerun of the command (a new job) starts again from zero."""
    fs, root = url_to_fs(f"{run_url.rstrip('/')}/monitoring/group_starts", options)
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


def start_training_monitor(config: Config, rank: int, world_size: int, device, step: int, epoch: int,
                           recomputes: bool | None = None):
    """The worker's monitor, serving /metrics, with every rank's target published by rank 0.

    Collective (one all_gather of a few bytes) when torch.distributed is initialised, so every
    rank must call it. Nothing here stops training: failures log a warning and are skipped.
    `recomputes`: whether any block recomputes its forward (the model's resolved checkpointing,
    `auto` included); hardware FLOPs count that forward again, as the planner does."""
    m, model = config.monitoring, config.model
    if not m.enabled:
        return with_tracking(Unmonitored(), config, rank, world_size, step)
    import torch.distributed as dist

    from monitoring.exporter import advertised_host, serve
    from monitoring.training import TrainingMonitor

    labels = {"run": config.run_name, "node": socket.gethostname(), "rank": str(rank)}
    try:  # model FLOPs per training image: forward, and backward at twice the forward
        flops = 3 * count_flops(model.name, model.image_size, model.num_classes)
    except Exception as e:
        log.warning("cannot count %s's FLOPs (%s); FLOP/s and MFU not exported", model.name, e)
        flops = None
    monitor = TrainingMonitor(labels, device, flops, m.peak_tflops * 1e12 if m.peak_tflops else None)
    if recomputes is None:  # not told: as configured (auto is resolved only where the model is built)
        recomputes = not isinstance(model.checkpointing, str) and model.checkpointing.every > 0
    monitor.recompute_factor = 4 / 3 if recomputes else 1.0  # as the planner counts it
    monitor.linger_seconds = m.linger_seconds
    monitor.checkpoint_interval.set(config.checkpoint.every_steps)
    options = storage_options(config.storage)
    try:
        local_rank, job_key, node_ip = _ray_identity()
    except Exception:  # outside Ray Train (benchmarks, tests): one process per node
        local_rank, job_key, node_ip = rank, None, None
    port = m.port + local_rank if m.port else 0
    address = (node_ip or "127.0.0.1") if m.address == "node" else m.address
    monitor.exporter = serve(monitor.registry, address, port, f"rank {rank} metrics")
    target = f"{advertised_host(address, node_ip)}:{monitor.exporter.port}" if monitor.exporter else None
    restarts = _group_restarts(config, options, job_key) if rank == 0 and job_key is not None else 0
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
    if rank == 0:
        _publish_targets(config, options, shared, monitor)
    monitor.restart_clock()  # the first step is timed from here, not from the setup above
    return with_tracking(monitor, config, rank, world_size, step)


def _group_restarts(config: Config, options: dict, job_key: str) -> int:
    try:
        return record_group_start(f"{config.storage.url.rstrip('/')}/{config.run_name}", options, job_key)
    except Exception as e:
        log.warning("cannot record the worker group start in storage (%s); restarts not counted", e)
        return 0


def _publish_targets(config: Config, options: dict, shared: list[tuple], monitor) -> None:
    """Rank 0: every rank's scrape target in the run's file_sd list, withdrawn at the end."""
    url = targets_url(config)
    try:
        listed = [(t, lab) for t, lab, _, _ in shared if t]
        write_targets(url, listed, options)
        monitor.withdraw_targets = lambda: remove_targets(url, options)
        warn_loopback_across_nodes(listed, {node for _, _, _, node in shared})
        print(f"monitoring: {len(listed)} of {len(shared)} workers' /metrics listed in {url} (Prometheus file_sd)",
              flush=True)
    except Exception as e:
        log.warning("cannot write the Prometheus target list %s (%s: %s)", url, type(e).__name__, e)
