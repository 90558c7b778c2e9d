"""`python -m coatnet_scale.profile`: the per-stage table of a real engine step (DeepSpeed ZeRO-3
on the CPU, gloo) on the demo corpus. Every row is there, the step's time is shared out among
them without gaps or overlaps, and each stage's FLOPs are the planner's count for its blocks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coatnet_scale.models import count_flops
from coatnet_scale.plan_checkpointing import block_costs, stem_and_head_flops

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_profile_prints_every_stage_of_a_zero3_step(demo_corpus, tmp_path):
    out = tmp_path / "profile.json"
    # Stage 2 checkpointed: its backward must count the recomputed forward.
    result = subprocess.run(
        [sys.executable, "-m", "coatnet_scale.profile", "--config", "tiny.yaml", "--steps", "2", "--json", str(out),
         "--set", f"data.train_manifest={demo_corpus}/train/manifest.json", "--set", "model.checkpointing.every=1",
         "--set", "model.checkpointing.stages=[2]", "--set", "train.micro_batch_size=16"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["row"]: r for r in report["rows"]}
    stages = ["stem (S0)", "S1 MBConv", "S2 MBConv", "S3 Transformer", "S4 Transformer", "head"]
    assert list(rows) == [*stages, "optimizer step", "ZeRO-3 gather/partition", "data wait", "other"]
    for name in stages:
        assert f"| {name:<24} |" in result.stdout
        assert rows[name]["forward_s"] > 0 and rows[name]["backward_s"] > 0, name
        assert rows[name]["bound"] in ("compute", "memory") and rows[name]["bytes"] > 0
    assert rows["optimizer step"]["forward_s"] > 0 and rows["ZeRO-3 gather/partition"]["backward_s"] > 0
    assert rows["data wait"]["forward_s"] > 0
    assert abs(sum(r["share"] for r in rows.values()) - 1) < 1e-6
    assert rows["other"]["share"] < 0.5  # the marks cover most of the step
    # FLOPs: the planner's per-block counts, times the micro-batch; backward 2x, +1x where recomputed.
    costs, batch = block_costs("coatnet_pico", 32, 10), 16
    assert rows["S2 MBConv"]["forward_flops"] == costs[1].flops * batch
    assert rows["S2 MBConv"]["flops"] == 4 * costs[1].flops * batch
    assert rows["S3 Transformer"]["flops"] == 3 * (costs[2].flops + costs[3].flops) * batch
    stem, head = stem_and_head_flops("coatnet_pico", 32, 10)
    assert rows["stem (S0)"]["forward_flops"] == stem * batch and rows["head"]["forward_flops"] == head * batch
    assert sum(rows[n]["forward_flops"] for n in stages) == count_flops("coatnet_pico", 32, 10) * batch
    assert "measured here" in report["peaks"] and report["timing"] == "wall time"
    # The engine's first lines say which attention kernel runs (engine/worker.py).
    assert "attention: model.attention_backend=auto runs math on cpu (tried efficient, math" in result.stdout
