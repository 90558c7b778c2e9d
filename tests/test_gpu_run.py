"""benchmarks/gpu_run.sh and gpu_run.py, the prepared GPU run, kept from rotting between leases:
the shell parses, the dry run lists the steps in the order a cut-short lease needs them, and the
configs and flags the headline steps pass are ones this checkout accepts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_run  # noqa: E402

from coatnet_scale.config import load_config  # noqa: E402


def test_the_script_runs_attention_first_and_the_headline_last(tmp_path):
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks/gpu_run.sh")]).returncode == 0
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable}
    result = subprocess.run(["bash", str(REPO / "benchmarks/gpu_run.sh"), "--dry-run"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    scripts = [c.split()[2] for c in commands]
    assert scripts == ["benchmarks/attention_check.py", "benchmarks/gpu_proof.py", "benchmarks/gpu_run.py",
                       "benchmarks/gpu_results.py"]
    assert "--skip attention" in commands[1] and f"--out {tmp_path}/proof.json" in commands[1]
    steps = json.loads((tmp_path / "headline-plan.json").read_text())["steps"]
    assert [s["step"] for s in steps] == ["ray start", "corpus", "job submit", "metrics mid-run", "job succeeded",
                                          "checkpoint complete", "handoff to 384", "fine-tune loss finite",
                                          "bias gradient at 576 tokens", "ray stop"]
    assert steps[-1]["needs"] is None  # ray stop runs whatever failed before it
    assert "--num-gpus=1" in steps[0]["command"] and "--tokens" in steps[8]["command"]


def test_the_headline_configs_validate(tmp_path):
    pretrain = load_config(REPO / "configs/coatnet6.yaml", gpu_run.pretrain_sets(tmp_path))
    assert pretrain.cluster.num_workers == 1 and pretrain.cluster.use_gpu and pretrain.cluster.max_resources is None
    assert pretrain.checkpoint.every_steps < pretrain.train.total_steps  # a checkpoint completes mid-run
    assert pretrain.monitoring.port == gpu_run.METRICS_PORT and pretrain.monitoring.address == "127.0.0.1"
    finetune = load_config(REPO / "configs/coatnet6_ft384.yaml", gpu_run.finetune_sets(tmp_path))
    assert finetune.model.image_size == 384 and (finetune.model.image_size // 16) ** 2 == 576
    assert finetune.model.name == pretrain.model.name
    # launch/handoff.py takes the flags the step passes
    handoff = subprocess.run([sys.executable, str(REPO / "launch/handoff.py"), "--help"], capture_output=True, text=True)
    for flag in ("--configs", "--set", "--address"):
        assert flag in handoff.stdout
