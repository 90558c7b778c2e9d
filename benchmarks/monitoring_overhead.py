"""What Prometheus monitoring, and the run-health checks, add to the step time of the tiny run
(configs/tiny.yaml), measured with each on and off in the same run.

    python benchmarks/monitoring_overhead.py [--blocks 24] [--block-steps 10] [--scrape-every 1]

Two ranks (gloo, DS_ACCELERATOR=cpu, one thread each, as `make demo` runs them) build the tiny
run's DeepSpeed ZeRO-3 engine and loader and take the worker's training steps (`train_step`). Steps go in
blocks, in the order off, on, health, health, on, off, ... so drifts in machine load cancel.
"Health" is off plus what engine/health.py and engine/watchdog.py add to each step: the ranks'
agreement (one all-reduce of a few numbers; it also carries the log line's sums, which the
worker used to all-reduce every log_every steps) and re-arming the faulthandler watchdog. "On" makes the worker's monitor calls and has its /metrics scraped every
--scrape-every seconds by a thread inside the worker process itself (an upper bound: Prometheus
scrapes from elsewhere, every 15 s by default); "off" calls the no-op monitor and nobody
scrapes. Prints the mean and median step time of both, their ratio (goal: <= 1.02), and the
noise-free bound: the monitor's own cost per step and per scrape, and the health checks' per
step (agreement and re-arm, 500 in a row on both ranks), timed in a loop.
"""
import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from coatnet_scale.storage import DEMO_DIR  # noqa: E402

DEMO = Path(DEMO_DIR)  # where `make demo` builds it


def rank_main(rank: int, world_size: int, port: int, args: argparse.Namespace, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu")
    import warnings

    from coatnet_scale.config import load_config
    from coatnet_scale.data import train_loader
    from coatnet_scale.engine.health import Health
    from coatnet_scale.engine.watchdog import Watchdog
    from coatnet_scale.engine.worker import EpochBatches, build_engine, train_step
    from coatnet_scale.engine.monitor import Unmonitored, start_training_monitor

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    config = load_config(REPO / "configs" / "tiny.yaml", [
        f"data.train_manifest={DEMO}/train/manifest.json", "data.val_manifest=null", f"storage.url={folder}",
        f"monitoring.targets_dir={folder}/targets", "train.total_steps=100000",
    ])
    t = config.train
    engine, scheduler = build_engine(config, False)
    loader = train_loader(config, rank, world_size)
    monitors = {"on": start_training_monitor(config, rank, world_size, torch.device("cpu"), 0, 0), "off": Unmonitored()}
    url = f"http://127.0.0.1:{monitors['on'].exporter.port}/metrics"
    scraping, done = threading.Event(), threading.Event()

    def scrape() -> None:
        while not done.is_set():
            if scraping.is_set():
                urllib.request.urlopen(url, timeout=10).read()
            time.sleep(args.scrape_every)

    threading.Thread(target=scrape, daemon=True).start()
    device, step = torch.device("cpu"), 0
    batches = EpochBatches(loader, 0)
    health = Health(config, folder, {}, rank, world_size, ["node"] * world_size, device, None, 0, [])
    health.started(Unmonitored())
    watchdog = Watchdog(folder, {}, None, rank)
    times: dict[str, list[float]] = {"on": [], "off": [], "health": []}
    for block in range(-1, args.blocks):  # block -1 warms up (loader workers, first allocations)
        mode = ("off", "on", "health", "health", "on", "off")[block % 6]
        monitor = monitors.get(mode, monitors["off"])
        scraping.set() if mode == "on" else scraping.clear()
        for _ in range(args.block_steps):
            # The worker's step (coatnet_scale/engine/worker.py), less its log window's all_reduce and print.
            start = time.monotonic()
            step += 1
            counts = train_step(engine, scheduler, batches, device, t, monitor, None, step)
            if mode == "health":
                health.agree(step, counts.loss, engine.get_global_grad_norm(), engine.was_step_applied(), counts.corrupt,
                             counts.images, time.monotonic() - start)
                watchdog.arm(t.hang_timeout_s)
            if step % t.log_every == 0:
                monitor.log()
            if block >= 0:
                times[mode].append(time.monotonic() - start)
    done.set()
    monitors["on"].close()
    # The health checks alone: agreement and re-arm, back to back on both ranks.
    torch.distributed.barrier()
    start = time.perf_counter()
    for i in range(500):
        health.agree(step + 1 + i, 2.0, 1.0, True, 0, 32, 0.1)
        watchdog.arm(t.hang_timeout_s)
    times["health_alone"] = [(time.perf_counter() - start) / 500]
    watchdog.close()
    if rank == 0:
        Path(folder, "times.json").write_text(json.dumps(times))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def isolated_costs() -> tuple[float, float]:
    """(seconds of monitor calls per step, seconds to render one scrape), no training around them."""
    from prometheus_client import generate_latest

    from monitoring.training import TrainingMonitor

    monitor = TrainingMonitor({"run": "bench", "node": "n", "rank": "0"}, torch.device("cpu"), 4e7, 1e11)
    batch = {"labels": torch.zeros(32), "corrupt": 0}
    norm = torch.tensor(1.0, dtype=torch.float64)
    n = 20000
    start = time.perf_counter()
    for i in range(n):
        monitor.batch(time.monotonic(), batch)
        monitor.step(i, 0, 2.0, 1e-3, norm)
        if i % 20 == 0:
            monitor.log()
    per_step = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for _ in range(200):
        generate_latest(monitor.registry)
    return per_step, (time.perf_counter() - start) / 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=24, help="measured blocks, half with monitoring on")
    parser.add_argument("--block-steps", type=int, default=10)
    parser.add_argument("--scrape-every", type=float, default=1.0, help="seconds between scrapes while on")
    args = parser.parse_args()
    from dataprep.demo import build_demo_corpus

    build_demo_corpus()  # idempotent
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="monitoring_overhead_") as folder:
        mp.spawn(rank_main, args=(2, port, args, folder), nprocs=2)
        times = json.loads(Path(folder, "times.json").read_text())
    per_step, per_scrape = isolated_costs()
    off, on, checked = times["off"], times["on"], times["health"]
    print(f"tiny run (coatnet_pico, 2 ranks, ZeRO-3, CPU): {len(off)} steps off, {len(on)} steps on, "
          f"scraped every {args.scrape_every:g} s while on")
    print(f"  step time, monitoring off: mean {statistics.mean(off) * 1e3:7.1f} ms   median {statistics.median(off) * 1e3:7.1f} ms")
    print(f"  step time, monitoring on:  mean {statistics.mean(on) * 1e3:7.1f} ms   median {statistics.median(on) * 1e3:7.1f} ms")
    print(f"  ratio on / off: mean {statistics.mean(on) / statistics.mean(off):.3f}   "
          f"median {statistics.median(on) / statistics.median(off):.3f}   (goal <= 1.02)")
    print(f"  step time, health checks:  mean {statistics.mean(checked) * 1e3:7.1f} ms   median "
          f"{statistics.median(checked) * 1e3:7.1f} ms   ratio to off: mean {statistics.mean(checked) / statistics.mean(off):.3f}"
          f"   median {statistics.median(checked) / statistics.median(off):.3f}   (goal <= 1.01)")
    alone = times["health_alone"][0]
    print(f"  health checks alone (agreement all-reduce of 2 ranks + watchdog re-arm): {alone * 1e6:.1f} us per step "
          f"({alone / statistics.median(off):.3%} of a step)")
    print(f"  monitor calls: {per_step * 1e6:.1f} us per step ({per_step / statistics.median(off):.4%} of a step); "
          f"one scrape renders in {per_scrape * 1e3:.2f} ms ({per_scrape / args.scrape_every:.3%} of a core at this rate)")


if __name__ == "__main__":
    main()
