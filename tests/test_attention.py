"""Attention kernels (model.attention_backend): at every block size the shipped configs train,
the relative-position bias table gets a non-zero gradient under the kernel the engine picks,
equal to the math kernel's and to attention written out by hand in float64. On the CPU the
kernels there are what runs (math; flash refuses a mask that needs its gradient);
benchmarks/gpu_proof.py's attention part checks the CUDA kernels on a GPU."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from coatnet_scale.config import ConfigError, load_config
from coatnet_scale.models import MODEL_SPECS, attention_order, probe_attention
from coatnet_scale.models.coatnet import RelativeAttention

REPO = Path(__file__).resolve().parent.parent


def config_token_counts() -> dict[int, list[str]]:
    """Token count of every Transformer stage's grid -> the shipped configs that train it."""
    counts: dict[int, list[str]] = {}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        m = load_config(path).model
        size, grids = m.image_size // 2, []
        for stage in MODEL_SPECS[m.name].stages:
            size //= stage.stride
            if stage.kind == "transformer":
                grids.append(size * size)
        for n in grids:
            counts.setdefault(n, []).append(path.name)
    return counts


TOKENS = sorted(config_token_counts())


def test_the_configs_train_the_six_headline_sizes():
    # 224 px: 196 and 49; 384: 576 and 144; 512: 1024 and 256 (stages 3 and 4); tiny configs' too.
    assert {49, 196, 144, 576, 256, 1024} <= set(TOKENS)
    assert {1, 4, 16} <= set(TOKENS)  # tiny.yaml at 32 px, tiny_ft.yaml at 64


def by_hand(x, module: RelativeAttention) -> torch.Tensor:
    """The same attention in float64 without scaled_dot_product_attention."""
    b, n, _ = x.shape
    qkv = torch.nn.functional.linear(x.double(), module.qkv.weight.double(), module.qkv.bias.double())
    q, k, v = qkv.view(b, n, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)
    table = module.relative_position_bias_table.double().flatten(1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + table[:, module.relative_position_index]
    y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
    return torch.nn.functional.linear(y, module.proj.weight.double(), module.proj.bias.double())


def table_gradient(module: RelativeAttention, x: torch.Tensor, weights: torch.Tensor, hand: bool = False):
    module.zero_grad(set_to_none=True)
    y = by_hand(x, module) if hand else module(x)
    (y * weights.to(y.dtype)).sum().backward()
    return module.relative_position_bias_table.grad.clone()


@pytest.mark.parametrize("tokens", TOKENS)
def test_bias_gets_its_gradient_at_every_config_size(tokens):
    side = math.isqrt(tokens)
    torch.manual_seed(tokens)
    engine = RelativeAttention(16, 32, 16, (side, side), backend="auto")  # 2 heads of 16: fast
    with torch.no_grad():  # a trained-looking table, not the zeros it starts as
        engine.relative_position_bias_table.normal_(0, 0.5)
    reference = RelativeAttention(16, 32, 16, (side, side), backend="math")
    reference.load_state_dict(engine.state_dict())
    x, weights = torch.randn(2, tokens, 16), torch.randn(2, tokens, 32)

    got = table_gradient(engine, x, weights)
    # One token (tiny.yaml's 1x1 stage 4): a softmax over one logit ignores its bias, so zero is right.
    assert (got.abs().sum() > 0) == (tokens > 1), f"{tokens} tokens: the bias table's gradient is {got.abs().sum()}"
    assert torch.allclose(got, table_gradient(reference, x, weights), rtol=1e-4, atol=1e-6)
    assert torch.allclose(got, table_gradient(engine, x, weights, hand=True), rtol=1e-3, atol=1e-5)
    assert probe_attention("auto", torch.device("cpu"), torch.float32, 16, tokens) == "math"


def test_a_kernel_that_cannot_take_the_bias_is_refused_by_name():
    assert attention_order("auto", torch.device("cpu")) == ("efficient", "math")  # efficient is CUDA-only: math runs
    # flash on the CPU runs with a mask, but not one that needs its gradient: refused, not dropped.
    with pytest.raises(ValueError, match=r"model.attention_backend=flash: no flash kernel .* on cpu"):
        probe_attention("flash", torch.device("cpu"), torch.bfloat16, 32, 49)
    with pytest.raises(ConfigError, match=r"model.attention_backend: no flash kernel takes an additive mask"):
        load_config(REPO / "configs/tiny.yaml", ["model.attention_backend=flash"])
    with pytest.raises(ConfigError, match=r"model.attention_backend=cudnn is a CUDA kernel and cluster.use_gpu=false"):
        load_config(REPO / "configs/tiny.yaml", ["model.attention_backend=cudnn"])
    assert load_config(REPO / "configs/coatnet5.yaml", ["model.attention_backend=cudnn"]).model.attention_backend == "cudnn"
