"""The training loop without Ray: in this process, or in each process torchrun starts.

    python -m coatnet_scale.pretrain --config configs/tiny.yaml --without-ray
    torchrun --nproc-per-node 8 -m coatnet_scale.pretrain --config configs/coatnet5.yaml --without-ray

For hosts that have PyTorch and little else: the loop Ray Train runs (engine/worker.py), over a
torch.distributed group started here, NCCL on GPUs (with `device_id`, so CUDA tensors only) or
gloo on CPUs. Rank 0 runs the preflight checks and every rank learns the outcome. The group's
size is the number of processes: when it differs from `cluster.num_workers` the batch is kept
as an elastic group would keep it (coatnet_scale/batch.py). What Ray adds is missing: restarts
(beyond torchrun's `--max-restarts`), elastic groups that change size by themselves, the
cluster check.

SIGTERM and SIGUSR1 (torchrun passes on the one it gets; Slurm's `--signal=USR1@120`) make
every rank save a checkpoint at the next step boundary and exit with code 75; the same command
resumes (engine/interrupt.py, docs/elastic.md).
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from coatnet_scale.config import Config


def _loopback_store(timeout: timedelta) -> dist.TCPStore:
    """The rendezvous store of a group of one. TCPStore's server listens on every interface
    whatever host it is given; this one gets a socket bound to loopback to listen on, so
    nothing off the host can reach it."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    return dist.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=timeout, master_listen_fd=listener.detach())


def init_process_group(use_gpu: bool, hang_timeout_s: float = 600.0):
    """Join torchrun's group (RANK, WORLD_SIZE, MASTER_ADDR… in the environment) or start a
    group of one on loopback. Returns this worker's Placement."""
    from coatnet_scale.engine.watchdog import collective_timeout_s
    from coatnet_scale.engine.worker import Placement

    # Longer than the step watchdog, so a rank stuck in a collective dumps its stacks first.
    timeout = timedelta(seconds=collective_timeout_s(hang_timeout_s))
    store = None
    if "RANK" not in os.environ and not dist.is_initialized():
        store = _loopback_store(timeout)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        group = {"store": store, "rank": rank, "world_size": world_size} if store else {}
        if use_gpu:
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=timeout, **group)
        else:
            dist.init_process_group("gloo", timeout=timeout, **group)
    # torchrun restarts a failed group only with --max-restarts; its run id names the job then.
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    job = f"torchrun-{run_id}" if restarts > 0 and run_id != "none" else None
    return Placement(rank, world_size, local_rank, node=socket.gethostname(), job=job)


def run(config: Config, preflight) -> dict:
    """Train on this process's group; `preflight(config)` runs on rank 0 first and raises to
    stop every rank. Returns rank 0's final figures (every rank returns its own)."""
    use_gpu = config.cluster.use_gpu
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")  # read once, when DeepSpeed is imported
    if use_gpu:  # NCCL's flight recorder and the allocator, set before the group exists
        from coatnet_scale.engine.watchdog import gpu_worker_env
        from coatnet_scale.engine.worker import run_url

        for key, value in gpu_worker_env(run_url(config)).items():
            os.environ.setdefault(key, value)
    from coatnet_scale.engine.interrupt import catch_signals

    catch_signals()  # here, in the main thread: the loop saves and stops at the next step boundary
    placement = init_process_group(use_gpu, config.train.hang_timeout_s)
    try:
        problem = [None]
        if placement.rank == 0:
            try:
                preflight(config)
            except Exception as e:
                problem = [e]
        dist.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise problem[0]
        from coatnet_scale.engine.worker import train

        return train(config, placement)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
