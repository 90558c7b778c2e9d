"""bf16 through the real engine on CPU (DeepSpeed ZeRO-3, gloo), and the guard that keeps the
engine's own collectives on the training device. The whole bf16 run under Ray, to the fp32
accuracy band, is test_finetune.py's pretraining job."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coatnet_scale.engine import collectives

REPO = Path(__file__).resolve().parent.parent

BF16_ENGINE = """
import json, os, sys, torch
os.environ.update(DS_ACCELERATOR="cpu")
from coatnet_scale.config import load_config
from coatnet_scale.engine.ema import ShardedEMA
from coatnet_scale.engine.worker import build_engine, forward_backward
from coatnet_scale.models.coatnet import BatchNorm2d
from coatnet_scale.standalone import init_process_group

init_process_group(use_gpu=False)
# Fine-tune-sized steps: most AdamW updates are below bf16's resolution near the weights' scale.
config = load_config(sys.argv[1], ["deepspeed.bf16=true", "cluster.num_workers=1", "train.global_batch_size=32",
                                   "train.lr=5e-5", "train.warmup_steps=0", "train.ema_decay=0.5"])
engine, _ = build_engine(config, use_gpu=False)
ema = ShardedEMA(engine.module, 0.5, engine.optimizer)
masters = engine.optimizer.fp32_partitioned_groups_flat
working = engine.optimizer.fp16_partitioned_groups_flat
expected = [m.double().clone() for m in masters]     # the EMA of the fp32 master, by hand
stairs = [w.double().clone() for w in working]       # the EMA of the bf16 working copy
norms = [m for m in engine.module.modules() if isinstance(m, BatchNorm2d)]
before = norms[0].running_mean.clone()
generator = torch.Generator().manual_seed(0)
for step in range(4):
    images = torch.randn(32, 3, 32, 32, generator=generator).bfloat16()
    targets = torch.nn.functional.one_hot(torch.randint(0, 10, (32,), generator=generator), 10).float()
    loss = forward_backward(engine, images, targets, "softmax")
    ema.update()
    expected = [e + 0.5 * (m.double() - e) for e, m in zip(expected, masters)]
    stairs = [e + 0.5 * (w.double() - e) for e, w in zip(stairs, working)]
print(json.dumps({
    "param_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
    "statistics_dtypes": sorted({str(b.dtype) for m in norms for b in (m.running_mean, m.running_var)}),
    "statistics_moved": float((norms[0].running_mean - before).abs().max()),
    "loss": float(loss),
    "ema_vs_master": max(float((f.double() - e).abs().max()) for f, e in zip(ema.flats, expected)),
    "stairs_vs_master": max(float((s - e).abs().max()) for s, e in zip(stairs, expected)),
}))
"""


def test_bf16_engine_keeps_statistics_and_ema_in_fp32(tmp_path):
    result = subprocess.run([sys.executable, "-c", BF16_ENGINE, str(REPO / "configs" / "tiny.yaml")],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    assert r["param_dtypes"] == ["torch.bfloat16"]  # zero.Init built the weights in bf16
    assert r["statistics_dtypes"] == ["torch.float32"] and r["statistics_moved"] > 0
    assert 0 < r["loss"] < 10
    # The EMA follows the fp32 master exactly; averaging the bf16 copy would be off by its stairs.
    assert r["ema_vs_master"] < 1e-6
    assert r["stairs_vs_master"] > 100 * max(r["ema_vs_master"], 1e-8)


def test_collective_on_the_wrong_device_is_refused():
    """meta stands in for cuda: a tensor built without device= lands on the CPU, which NCCL refuses."""
    with collectives.audit(torch.device("meta")):
        assert collectives.all_reduce(torch.zeros(2, device="meta")).device.type == "meta"
        with pytest.raises(RuntimeError, match="tensor on cpu, but collectives run on meta"):
            collectives.all_reduce(torch.tensor([1.0, 2.0], dtype=torch.float64))
        with pytest.raises(RuntimeError, match="tensor on cpu"):
            collectives.broadcast(torch.zeros(3))


def test_every_tensor_collective_goes_through_the_guard():
    """The engine's own tensor collectives are collectives.py's; a direct dist.all_reduce of a
    tensor built without a device (the log window's once) fails here."""
    direct = []
    for path in [*(REPO / "coatnet_scale").rglob("*.py"), *(REPO / "monitoring").rglob("*.py")]:
        if path.name == "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in {"all_reduce", "broadcast", "all_gather", "reduce_scatter", "reduce",
                                           "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all"}
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "dist"):
                direct.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert direct == []
