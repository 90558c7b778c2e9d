"""The CoAtNet family: sizes against the paper, shapes, checkpointing, resizing, imports."""
import subprocess
import sys

import pytest
import torch

from coatnet_scale.models import (
    MODEL_SPECS,
    Checkpointing,
    count_flops,
    count_parameters,
    create_model,
    list_models,
    resize_relative_position,
)

PAPER_SIZES = [name for name, spec in MODEL_SPECS.items() if spec.paper_params]
TINY_SIZES = [name for name, spec in MODEL_SPECS.items() if not spec.paper_params]


def test_registry_names():
    assert [f"coatnet_{i}" for i in range(8)] == PAPER_SIZES
    assert "coatnet_pico" in list_models()


@pytest.mark.parametrize("name", list_models())
def test_parameter_count_on_meta_device(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=1000, image_size=224)
    assert all(p.is_meta for p in model.parameters())
    params = count_parameters(model)
    expected = MODEL_SPECS[name].paper_params
    if expected is None:
        assert params < 2e6, f"{name} is a CPU test size and must stay under 2M parameters"
    else:
        assert abs(params / expected - 1) < 0.02, f"{name}: {params / 1e6:.1f}M vs paper {expected / 1e6:.0f}M"


def test_stage_resolutions_at_224():
    """Spatial size per stage: 112 (stem), 56, 28, 14, 7, as in DESIGN.md."""
    with torch.device("meta"):
        model = create_model("coatnet_6")
    grids = [block.attn.grid for blocks in model.stages for block in blocks if hasattr(block, "attn")]
    assert set(grids) == {(14, 14), (7, 7)}
    assert grids.count((14, 14)) == 42 and grids.count((7, 7)) == 2
    sizes = []
    x = torch.empty(1, 3, 224, 224, device="meta")
    x = model.stem(x)
    sizes.append(x.shape[-1])
    for blocks in model.stages[:3]:  # the MBConv stages, channels-first
        for block in blocks:
            x = block(x)
        sizes.append(x.shape[-1])
    assert sizes == [112, 56, 28, 14]


@pytest.mark.parametrize("name", TINY_SIZES)
@pytest.mark.parametrize("image_size", [32, 64])
def test_tiny_forward_backward(name, image_size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, image_size=image_size, drop_path_rate=0.1)
    images = torch.randn(4, 3, image_size, image_size)
    logits = model(images)
    assert logits.shape == (4, 10)
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters with no gradient: {missing[:5]}"
    table = model.stages[-2][0].attn.relative_position_bias_table
    assert table.grad.abs().sum() > 0, "the relative-position table gets no gradient"


def test_wrong_image_size_is_rejected():
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("coatnet_pico", image_size=48)


def test_relative_bias_matches_explicit_attention():
    """SDPA with the bias as its mask equals softmax(q.k/sqrt(d) + w[i-j]) v, written out."""
    from coatnet_scale.models.coatnet import RelativeAttention

    torch.manual_seed(0)
    attn = RelativeAttention(16, 32, 8, (3, 4))
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(2, 12, 16)
    b, n, _ = x.shape
    q, k, v = attn.qkv(x).view(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    table = attn.relative_position_bias_table
    bias = torch.empty(attn.num_heads, n, n)
    for i in range(n):
        for j in range(n):
            (yi, xi), (yj, xj) = divmod(i, 4), divmod(j, 4)
            bias[:, i, j] = table[:, yi - yj + 2, xi - xj + 3]
    logits = q @ k.transpose(-1, -2) / 8**0.5 + bias
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))
    torch.testing.assert_close(attn(x), expected)


def test_bf16_autocast_forward_backward():
    model = create_model("coatnet_pico", num_classes=10, image_size=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "policy", [Checkpointing(every=1), Checkpointing(every=2), Checkpointing(every=1, stages=(3, 4)),
               Checkpointing(blocks=(0, 3, 4))]
)
def test_checkpointing_gives_equal_gradients(policy):
    def run(checkpointing):
        torch.manual_seed(0)
        model = create_model("coatnet_pico_split", 10, 64, drop_path_rate=0.2, checkpointing=checkpointing)
        torch.manual_seed(1)
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.arange(4))
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return loss, grads, {n: b for n, b in model.named_buffers() if "running" in n}

    loss_plain, grads_plain, stats_plain = run(Checkpointing())
    loss_ckpt, grads_ckpt, stats_ckpt = run(policy)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=0)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # Recomputation must not update BatchNorm running statistics a second time.
    for name, stat in stats_plain.items():
        torch.testing.assert_close(stats_ckpt[name], stat, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpointing_actually_recomputes():
    """Forward passes per block: 2 with checkpointing (forward + recompute), 1 without."""
    calls = []

    def count_calls(every):
        model = create_model("coatnet_pico", 10, 32, checkpointing=Checkpointing(every=every))
        first_transformer = model.stages[2][0]
        calls.clear()
        first_transformer.register_forward_pre_hook(lambda *_: calls.append(1))
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        return len(calls)

    assert count_calls(0) == 1
    assert count_calls(1) == 2


def test_per_block_checkpointing_recomputes_exactly_those_blocks():
    """The per-block form (what model.checkpointing=auto resolves to) names blocks over the whole
    model; every/stages are then ignored."""
    model = create_model("coatnet_pico_split", 10, 64, checkpointing=Checkpointing(every=1, blocks=(1, 4)))
    blocks = [block for stage in model.stages for block in stage]
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert calls == [2 if i in (1, 4) else 1 for i in range(len(blocks))]
    assert model.checkpointing.chosen(model.spec) == [1, 4] and Checkpointing(blocks=()).enabled is False


def test_resize_to_same_size_is_identity():
    model = create_model("coatnet_pico", num_classes=10, image_size=64)
    resized = resize_relative_position(model, 64)
    for key, value in model.state_dict().items():
        assert torch.equal(resized[key], value), key


def test_resize_224_to_384_loads_strictly():
    torch.manual_seed(0)
    source = create_model("coatnet_pico", num_classes=10, image_size=224)
    with torch.no_grad():
        for block in (b for blocks in source.stages for b in blocks if hasattr(b, "attn")):
            block.attn.relative_position_bias_table.normal_()
    state = resize_relative_position(source.state_dict(), 384, old_image_size=224)
    target = create_model("coatnet_pico", num_classes=10, image_size=384)
    target.load_state_dict(state, strict=True)
    table_224 = source.stages[2][0].attn.relative_position_bias_table  # 14x14 grid: 27x27 table
    table_384 = target.stages[2][0].attn.relative_position_bias_table  # 24x24 grid: 47x47 table
    assert table_224.shape[1:] == (27, 27) and table_384.shape[1:] == (47, 47)
    # Bilinear with aligned corners keeps the zero offset and the extreme offsets exactly.
    torch.testing.assert_close(table_384[:, 23, 23], table_224[:, 13, 13])
    torch.testing.assert_close(table_384[:, 0, 46], table_224[:, 0, 26])
    with torch.no_grad():
        assert target(torch.randn(1, 3, 384, 384)).shape == (1, 10)


def test_resize_state_dict_needs_old_size():
    with pytest.raises(ValueError, match="old_image_size"):
        resize_relative_position(create_model("coatnet_pico").state_dict(), 384)


def test_flops_of_coatnet_0_match_paper():
    """The paper lists CoAtNet-0 at 4.2 GFLOPs (multiply-adds) at 224; we count 2 per MAC."""
    flops = count_flops("coatnet_0", 224)
    assert 4.0e9 < flops / 2 < 4.4e9
    assert count_flops("coatnet_0", 384) > 2.5 * flops


def test_coatnet_7_builds_on_meta():
    with torch.device("meta"):
        model = create_model("coatnet_7", image_size=224)
    assert count_parameters(model) > 2.4e9
    assert model(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 1000)


def test_models_import_without_training_stack():
    code = (
        "import sys\n"
        "for name in ('deepspeed', 'ray', 'webdataset', 's3fs'):\n"
        "    sys.modules[name] = None  # makes `import name` raise ImportError\n"
        "from coatnet_scale.models import create_model\n"
        "model = create_model('coatnet_pico', num_classes=10, image_size=32)\n"
        "print(sum(p.numel() for p in model.parameters()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 1e6
