"""benchmarks/gpu_proof.py --smoke: the GPU proof's code path at tiny sizes on the CPU (gloo,
bf16), with Ray, s3fs and the Prometheus client unimportable, as on a GPU host that has only
PyTorch. The script cannot rot between GPU runs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_proof_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_proof.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    engine, baselines, largest = report["engine"], report["baselines"], report["largest"]
    assert engine["images_per_second"] > 0 and engine["forward_flops_per_image"] > engine["recomputed_flops_per_image"] > 0
    assert engine["resume_bit_identical"] is True  # the resumed run took the last step again, to the bit
    assert engine["modules_left_on_zero3_stack"] == 0  # both engines released, the stack trimmed every step
    assert engine["export_bytes"] > 1_000_000  # ~1.2M fp32 parameters
    assert baselines["plain_images_per_second"] > 0 and baselines["profile"]
    assert largest["micro_batch"] >= 1 and largest["images_per_second"] > 0
    assert "| resume: next loss bit-identical" in result.stdout
    # The ablation: every lever a row, the planner's figure beside each; auto chose its blocks
    # for the pretend 0.5 GiB device, between none and full.
    rows = {r["row"]: r for r in report["ablation"]}
    assert list(rows) == ["checkpointing full", "checkpointing auto", "auto + channels-last", "auto + compiled blocks"]
    assert "skipped" in rows["auto + compiled blocks"]
    for name in ("checkpointing full", "checkpointing auto", "auto + channels-last"):
        assert rows[name]["images_per_second"] > 0 and rows[name]["predicted_bytes"] > 0
    assert rows["checkpointing full"]["checkpointed_blocks"] == "5 of 5"
    assert "| checkpointing auto" in result.stdout
