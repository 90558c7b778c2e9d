"""What resuming on another number of workers costs: DeepSpeed's universal conversion (time,
disk, memory) and the universal load (memory per rank), against the checkpoint's own size and
an ordinary resume measured in the same run; scaled to CoAtNet-7 at the end.

    python benchmarks/reshard_cost.py [--model coatnet_1] [--workers 2]

1. `--workers` processes (torchrun) pretrain --model for 2 steps on the demo corpus and save a
   ZeRO-3 checkpoint (fp32 on the CPU: 4 bytes of weights + 12 of optimizer state per parameter).
2. Checkpoints.convert runs ds_to_universal on it as rank 0 does on a resize (one process, the
   baseline) and with one process per core: wall time of each, peak resident memory of the converter, and peak disk in the work folder (polled)
   against the checkpoint's bytes.
3. One process resumes the checkpoint on 1 worker (the universal load) and, as the baseline,
   the same run resumes a checkpoint written by 1 worker (an ordinary load): each process's
   peak resident memory; the difference per parameter is what the universal loader adds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
COATNET_7 = 2_435_860_000


def run(args: list[str], env: dict) -> None:
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env)
    if result.returncode != 0:
        raise SystemExit(f"reshard_cost: {' '.join(args[:6])}… failed:\n{result.stderr[-3000:]}")


def peak_rss_of(args: list[str], env: dict) -> int:
    """Peak resident bytes of a child process (Linux reports KiB)."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, env=env)
    if result.returncode != 0:
        raise SystemExit(f"reshard_cost: {' '.join(args[:6])}… failed:\n{result.stderr[-3000:]}")
    return int(result.stdout.strip().splitlines()[-1])


def folder_bytes(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):  # the converter removes its temporary files as it goes
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except FileNotFoundError:
                pass
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="coatnet_1")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from dataprep.demo import build_demo_corpus
    from coatnet_scale.engine.checkpoint import Checkpoints
    from coatnet_scale.models import count_parameters, create_model

    import torch

    with torch.device("meta"):
        params = count_parameters(create_model(args.model, num_classes=10, image_size=32))
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    build_demo_corpus()  # idempotent: where `make demo` builds it
    work = Path(tempfile.mkdtemp(prefix="reshard_cost_"))
    try:
        def pretrain(world: int, run_name: str, steps: int, launcher: list[str]) -> list[str]:
            batch = 8 * args.workers
            return [*launcher, "-m", "coatnet_scale.pretrain", "--config", str(REPO / "configs" / "tiny.yaml"),
                    "--without-ray", f"--set=run_name={run_name}", f"--set=model.name={args.model}",
                    f"--set=cluster.num_workers={world}", f"--set=train.global_batch_size={batch}",
                    "--set=train.micro_batch_size=8", f"--set=train.total_steps={steps}", "--set=train.log_every=1",
                    f"--set=checkpoint.every_steps={steps}", f"--set=storage.url={work}", "--set=monitoring.enabled=false",
                    "--set=data.val_manifest=null", "--set=data.num_workers=0", "--set=cluster.cpus_per_worker=1"]

        torchrun = [str(Path(sys.executable).parent / "torchrun"), f"--nproc-per-node={args.workers}"]
        print(f"reshard_cost: {args.model} ({params / 1e6:.1f}M parameters): {args.workers} workers train 2 steps", flush=True)
        run(pretrain(args.workers, "wide", 2, torchrun), env)
        run(pretrain(1, "narrow", 2, [sys.executable]), env)
        checkpoints = Checkpoints(str(work / "wide" / "checkpoints"), {}, keep=2, rank=0, world_size=1)
        processes = max(2, os.cpu_count() or 1)
        tag, marker = checkpoints.choose()
        checkpoint_bytes = folder_bytes(work / "wide" / "checkpoints" / tag)

        # Conversion, with the work folder's disk use polled while it runs.
        peak_disk, done = [0], threading.Event()

        def poll():
            while not done.is_set():
                peak_disk[0] = max(peak_disk[0], folder_bytes(work / "wide" / "checkpoints" / "universal"))
                time.sleep(0.1)

        # Rank 0's step on a resize, in a process of its own so that its peak memory is its own:
        # with one converter process per core, then with one (what a resize runs), the baseline.
        convert = ("import sys; from coatnet_scale.engine.checkpoint import Checkpoints; "
                   "c = Checkpoints(sys.argv[1], {}, keep=2, rank=0, world_size=1, convert_workers=int(sys.argv[2])); "
                   "c.convert(*c.choose())")
        universal = work / "wide" / "checkpoints" / "universal"
        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        start = time.monotonic()
        converter_rss = peak_rss_of([sys.executable, "-c", convert, str(work / "wide" / "checkpoints"), str(processes)], env)
        convert_seconds = time.monotonic() - start
        done.set()
        watcher.join()
        shutil.rmtree(universal)
        start = time.monotonic()
        converter_rss_one = peak_rss_of([sys.executable, "-c", convert, str(work / "wide" / "checkpoints"), "1"], env)
        convert_seconds_one = time.monotonic() - start
        universal_bytes = checkpoints._universal_marker(tag)["bytes"]

        # Loads: one process resumes each run for one more step; the difference is the universal loader's.
        resumed = peak_rss_of(pretrain(1, "wide", 3, [sys.executable]), env)
        ordinary = peak_rss_of(pretrain(1, "narrow", 3, [sys.executable]), env)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    extra = max(0, resumed - ordinary)
    report = {
        "model": args.model, "parameters": params, "checkpoint_bytes": checkpoint_bytes,
        "checkpoint_bytes_per_parameter": checkpoint_bytes / params, "convert_seconds": convert_seconds,
        "convert_processes": processes, "convert_seconds_one_process": convert_seconds_one,
        "converter_peak_rss_one_process": converter_rss_one,
        "universal_bytes": universal_bytes, "peak_disk_bytes": max(peak_disk[0], universal_bytes),
        "converter_peak_rss": converter_rss, "resume_universal_peak_rss": resumed, "resume_ordinary_peak_rss": ordinary,
        "universal_load_extra_bytes_per_parameter": extra / params,
    }
    GiB = 2**30
    print(f"checkpoint ({args.workers} ranks): {checkpoint_bytes / GiB:.3f} GiB = {report['checkpoint_bytes_per_parameter']:.1f} B/parameter")
    speedup = convert_seconds_one / convert_seconds
    print(f"conversion: {convert_seconds:.1f} s with {processes} converter processes, {convert_seconds_one:.1f} s with one "
          f"(the baseline): {speedup:.2f}x; universal copy {universal_bytes / GiB:.3f} GiB "
          f"({universal_bytes / checkpoint_bytes:.2f}x the checkpoint); peak disk {report['peak_disk_bytes'] / GiB:.3f} GiB "
          f"({report['peak_disk_bytes'] / checkpoint_bytes:.2f}x)"
          + f"; converter peak memory with one process {converter_rss_one / GiB:.2f} GiB ({converter_rss_one / checkpoint_bytes:.2f}x "
            f"the checkpoint, {converter_rss_one / (checkpoint_bytes / args.workers):.1f}x one rank's files: it reads one rank's "
            f"files, then one parameter's fragments, at a time), {converter_rss / GiB:.2f} GiB in the largest of {processes}")
    print(f"resume on 1 worker: universal {resumed / GiB:.2f} GiB peak against ordinary {ordinary / GiB:.2f} GiB "
          f"(ratio {resumed / ordinary:.2f}); the universal loader adds {extra / params:.1f} B/parameter per rank "
          f"(it reads one whole parameter at a time) but reads the whole universal copy on every rank: "
          f"{universal_bytes / GiB:.3f} GiB per rank against {checkpoint_bytes / args.workers / GiB:.3f} GiB "
          f"for an ordinary resume at {args.workers}")
    scale = COATNET_7 / params
    print(f"CoAtNet-7 (2.44B parameters), scaled by parameters: conversion ~{convert_seconds_one * scale / 60:.0f} min with "
          f"one process, ~{convert_seconds * scale / 60:.0f} min with {processes} on this machine's cores; "
          f"the other ranks wait for it in storage, not in a collective; peak disk "
          f"~{report['peak_disk_bytes'] * scale / GiB:.0f} GiB; converter memory at most "
          f"~{converter_rss_one * scale / GiB:.0f} GiB per process (as measured here, {args.workers} ranks' files) and about "
          f"{converter_rss_one / (checkpoint_bytes / args.workers) * checkpoint_bytes * scale / 256 / GiB:.1f} GiB if it "
          f"scales with one of 256 ranks' files; the universal load adds ~{extra / params * COATNET_7 / GiB:.0f} GiB per rank "
          f"and reads ~{universal_bytes / params * COATNET_7 / GiB:.0f} GiB on every rank (once per node from an object store)")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
