"""The headline command on one GPU host: a Ray cluster of one node, `ray job submit` of a short
CoAtNet-6 pretraining run, its /metrics scraped while it runs, a complete checkpoint, launch/'s
handoff of that checkpoint to fine-tuning at 384 px for a few steps, the bias-gradient check at
576 tokens (stage 3 at 384 px), `ray stop`: all in one call, in that order.

    python benchmarks/gpu_run.py --out $OUT/headline.json             # on the GPU host (Ray installed)
    python benchmarks/gpu_run.py --out plan.json --dry-run             # the steps and commands, run nothing

Each step's outcome is written to --out as soon as the step ends, so a time limit loses nothing
already done; a failed step is recorded and the steps that need it are skipped; `ray stop` runs
whatever happened. Exit status 0 only when every step passed. benchmarks/gpu_run.sh runs this
after benchmarks/gpu_proof.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METRICS_PORT = 9464  # monitoring.port: the worker of local rank 0 serves /metrics here
DASHBOARD = "http://127.0.0.1:8265"


def pretrain_sets(work: Path) -> list[str]:
    """coatnet6.yaml as a short run on one GPU and the corpus built here."""
    return [
        "run_name=gpu-headline", f"data.train_manifest={work}/corpus/train/manifest.json", "data.val_manifest=null",
        "data.num_workers=4", "model.num_classes=10", "model.compile=none",  # compiling 50 blocks: minutes
        "train.micro_batch_size=32", "train.global_batch_size=32", "train.grad_accum_steps=1", "train.total_steps=24",
        "train.warmup_steps=2", "train.log_every=2", "train.eval_every=0", "cluster.num_workers=1",
        "cluster.cpus_per_worker=8", "cluster.max_resources=null", "deepspeed.zero_hpz_partition_size=1",
        "checkpoint.every_steps=20", "checkpoint.keep=1",
        f"storage.url={work}/runs", "monitoring.address=127.0.0.1", f"monitoring.port={METRICS_PORT}",
        "monitoring.linger_seconds=15",
    ]


def finetune_sets(work: Path) -> list[str]:
    return [
        "run_name=gpu-ft384", f"data.train_manifest={work}/corpus/train/manifest.json", "data.val_manifest=null",
        "data.num_workers=4", "train.micro_batch_size=8", "train.global_batch_size=8", "train.total_steps=4",
        "train.log_every=1", "train.eval_every=0", "cluster.num_workers=1", "cluster.cpus_per_worker=8",
        "cluster.max_resources=null", "deepspeed.zero_hpz_partition_size=1", "checkpoint.at_end=false",
        f"storage.url={work}/runs", "monitoring.enabled=false",
    ]


def steps(work: Path) -> list[tuple[str, list[str]]]:
    """(name, command) in order; a command starting with '@' is done in this process."""
    py = sys.executable
    sets = [f"--set={s}" for s in pretrain_sets(work)]
    return [
        ("ray start", ["ray", "start", "--head", "--num-gpus=1", "--node-ip-address=127.0.0.1",
                       "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats"]),
        ("corpus", [py, "-m", "dataprep", "demo", f"{work}/corpus"]),
        ("job submit", ["ray", "job", "submit", f"--address={DASHBOARD}", "--no-wait", "--working-dir", ".",
                        "--submission-id", "gpu-headline", "--", "python", "-m", "coatnet_scale.pretrain",
                        "--config", "configs/coatnet6.yaml", *sets]),
        ("metrics mid-run", ["@scrape", f"http://127.0.0.1:{METRICS_PORT}/metrics"]),
        ("job succeeded", ["@wait", "gpu-headline"]),
        ("checkpoint complete", ["@checkpoint", f"{work}/runs/gpu-headline/checkpoints"]),
        ("handoff to 384", [py, "launch/handoff.py", f"{work}/runs/gpu-headline", "--address", DASHBOARD,
                            "--configs", "configs/coatnet6_ft384.yaml", *(f"--set={s}" for s in finetune_sets(work))]),
        ("fine-tune loss finite", ["@losses", f"{work}/runs/gpu-ft384"]),
        ("bias gradient at 576 tokens", [py, "benchmarks/attention_check.py", "--tokens", "576", "--heads", "12",
                                         "--head-dim", "128", "--out", f"{work}/bias576.json"]),
        ("ray stop", ["ray", "stop", "--force"]),
    ]


NEEDS = {"job submit": "ray start", "metrics mid-run": "job submit", "job succeeded": "job submit",
         "checkpoint complete": "job succeeded", "handoff to 384": "checkpoint complete",
         "fine-tune loss finite": "handoff to 384"}


def scrape(url: str, timeout_s: float = 900) -> dict:
    """Polls /metrics until it shows a step with images/s and loss; those lines."""
    deadline, wanted = time.monotonic() + timeout_s, ("coatnet_images_per_second", "coatnet_loss", "coatnet_step")
    while time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            time.sleep(5)
            continue
        values = {}
        for name in wanted:
            match = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)
            if match:
                values[name] = float(match.group(1))
        if len(values) == len(wanted) and values["coatnet_step"] > 0 and values["coatnet_images_per_second"] > 0:
            return {"passed": math.isfinite(values["coatnet_loss"]), **values}
        time.sleep(5)
    return {"passed": False, "why": f"no step with images/s and loss on {url} within {timeout_s:g}s"}


def wait_job(job_id: str, timeout_s: float = 1200) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["ray", "job", "status", f"--address={DASHBOARD}", job_id], capture_output=True, text=True)
        status = next((s for s in ("SUCCEEDED", "FAILED", "STOPPED") if s in out.stdout), None)
        if status:
            logs = subprocess.run(["ray", "job", "logs", f"--address={DASHBOARD}", job_id], capture_output=True, text=True)
            return {"passed": status == "SUCCEEDED", "status": status, "log_tail": logs.stdout[-4000:]}
        time.sleep(5)
    return {"passed": False, "why": f"{job_id} not finished within {timeout_s:g}s"}


def checkpoint(folder: str) -> dict:
    done = sorted(p.parent.name for p in Path(folder).glob("step_*/COMPLETE.json"))
    return {"passed": bool(done), "complete": done}


def losses(run: str) -> dict:
    found = sorted(Path(run).glob("metrics-step*.json"))
    history = json.loads(found[-1].read_text())["history"] if found else []
    values = [h["loss"] for h in history if "loss" in h]
    return {"passed": bool(values) and all(math.isfinite(v) for v in values), "losses": values}


def run_step(command: list[str], env: dict) -> dict:
    kind = command[0]
    if kind == "@scrape":
        return scrape(command[1])
    if kind == "@wait":
        return wait_job(command[1])
    if kind == "@checkpoint":
        return checkpoint(command[1])
    if kind == "@losses":
        return losses(command[1])
    start = time.monotonic()
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    result = {"passed": out.returncode == 0, "returncode": out.returncode, "output_tail": (out.stdout + out.stderr)[-3000:]}
    if command[1:2] == ["benchmarks/attention_check.py"]:
        result["check"] = json.loads(Path(command[-1]).read_text()) if Path(command[-1]).exists() else None
    result["seconds"] = time.monotonic() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON, rewritten after every step")
    parser.add_argument("--work", default="/tmp/coatnet-gpu-run", help="corpus and runs (local disk)")
    parser.add_argument("--dry-run", action="store_true", help="write the steps and their commands; run nothing")
    args = parser.parse_args(argv)
    work = Path(args.work)
    report: dict = {"steps": []}
    plan = steps(work)
    if args.dry_run:
        report["steps"] = [{"step": name, "command": command, "needs": NEEDS.get(name)} for name, command in plan]
        Path(args.out).write_text(json.dumps(report, indent=1))
        return 0
    if shutil.which("ray") is None:
        raise SystemExit("gpu_run: no `ray` on PATH: install ray[default,train] (docs/benchmarks.md)")
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}", "RAY_ADDRESS": DASHBOARD}
    work.mkdir(parents=True, exist_ok=True)
    passed: set[str] = set()
    for name, command in plan:
        needed = NEEDS.get(name)
        if needed and needed not in passed:
            result = {"passed": False, "skipped": f"needs {needed!r}, which did not pass"}
        else:
            result = run_step(command, env)
        if result["passed"]:
            passed.add(name)
        report["steps"].append({"step": name, **result})
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"gpu_run: {name}: {'passed' if result['passed'] else 'FAILED'}", flush=True)
    return 0 if len(passed) == len(plan) else 1


if __name__ == "__main__":
    sys.exit(main())
