"""The CoAtNet family (Dai et al., 2021, "CoAtNet: Marrying Convolution and Attention").

Layout C-C-T-T: a two-conv stem, MBConv stages, then Transformer stages with 2-D relative
attention. Every variant is a `CoAtNetSpec` record in `MODEL_SPECS`; CoAtNet-6/7 split the
third stage into MBConv blocks followed by wider Transformer blocks at the same resolution.

Plain PyTorch: nothing here knows about DeepSpeed, Ray or the data pipeline. Weights are
initialised inside each layer's own constructor (see `Linear`/`Conv2d` below), so a model
built under `deepspeed.zero.Init` is initialised shard by shard, and one built on the meta
device allocates nothing.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

# ---------------------------------------------------------------------------------------
# Variants


@dataclass(frozen=True)
class Stage:
    kind: str  # "mbconv" or "transformer"
    depth: int
    dim: int
    stride: int  # 2 for the first block of a new resolution, 1 to widen at the same one
    paper_stage: int  # S1..S4 in the paper's numbering; checkpointing policies name these


@dataclass(frozen=True)
class CoAtNetSpec:
    stem_dim: int
    stages: tuple[Stage, ...]
    head_dim: int  # attention head width; heads = stage dim // head_dim
    paper_params: float | None = None  # the paper's count at 224 px, 1000 classes


def _cctt(stem: int, depths, dims, head_dim: int, paper_params: float | None = None) -> CoAtNetSpec:
    kinds = ("mbconv", "mbconv", "transformer", "transformer")
    stages = tuple(Stage(k, d, c, 2, i + 1) for i, (k, d, c) in enumerate(zip(kinds, depths, dims)))
    return CoAtNetSpec(stem, stages, head_dim, paper_params)


def _split_s3(stem: int, s1, s2, s3_conv, s3_attn, s4, head_dim: int, paper_params: float) -> CoAtNetSpec:
    """CoAtNet-6/7: S3 holds MBConv blocks, then Transformer blocks at twice the width."""
    stages = (
        Stage("mbconv", s1[0], s1[1], 2, 1),
        Stage("mbconv", s2[0], s2[1], 2, 2),
        Stage("mbconv", s3_conv[0], s3_conv[1], 2, 3),
        Stage("transformer", s3_attn[0], s3_attn[1], 1, 3),
        Stage("transformer", s4[0], s4[1], 2, 4),
    )
    return CoAtNetSpec(stem, stages, head_dim, paper_params)


MODEL_SPECS: dict[str, CoAtNetSpec] = {
    # Tiny variants for CPU tests and the quick start: same blocks, train at 32-64 px.
    "coatnet_pico": _cctt(32, (1, 1, 2, 1), (32, 64, 128, 256), 32),
    "coatnet_pico_split": _split_s3(32, (1, 32), (1, 64), (1, 64), (2, 128), (1, 256), 32, None),
    # The paper's table (DESIGN.md section 3).
    "coatnet_0": _cctt(64, (2, 3, 5, 2), (96, 192, 384, 768), 32, 25e6),
    "coatnet_1": _cctt(64, (2, 6, 14, 2), (96, 192, 384, 768), 32, 42e6),
    "coatnet_2": _cctt(128, (2, 6, 14, 2), (128, 256, 512, 1024), 32, 75e6),
    "coatnet_3": _cctt(192, (2, 6, 14, 2), (192, 384, 768, 1536), 32, 168e6),
    "coatnet_4": _cctt(192, (2, 12, 28, 2), (192, 384, 768, 1536), 32, 275e6),
    "coatnet_5": _cctt(192, (2, 12, 28, 2), (256, 512, 1280, 2048), 64, 688e6),
    # The paper's table gives CoAtNet-6 an S4 width of 2048, but its own 1.47B parameters (and
    # its FLOPs, relative to CoAtNet-7's) only add up with 3072, the width CoAtNet-7 uses.
    "coatnet_6": _split_s3(192, (2, 192), (4, 384), (8, 768), (42, 1536), (2, 3072), 128, 1.47e9),
    "coatnet_7": _split_s3(192, (2, 256), (4, 512), (8, 1024), (42, 2048), (2, 3072), 128, 2.44e9),
}


@dataclass(frozen=True)
class Checkpointing:
    """Which blocks recompute their activations in the backward pass.

    every: 0 = none, 1 = every block, k = every k-th block (counted within each stage).
    stages: the paper's stage numbers (1..4) it applies to; S3 of CoAtNet-6/7 covers both its
    MBConv and its Transformer blocks.
    blocks: the per-block form, which replaces every/stages when given: the indices of the
    blocks to checkpoint, counted over the whole model from 0 (the first block of S1).
    """

    every: int = 0
    stages: tuple[int, ...] = (1, 2, 3, 4)
    blocks: tuple[int, ...] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.blocks) if self.blocks is not None else self.every > 0

    def applies(self, paper_stage: int, index_in_stage: int, block: int) -> bool:
        """Whether the block `index_in_stage` of its stage, `block` of the model, recomputes."""
        if self.blocks is not None:
            return block in self.blocks
        return self.every > 0 and paper_stage in self.stages and index_in_stage % self.every == 0

    def chosen(self, spec: "CoAtNetSpec") -> list[int]:
        """The model's block indices this policy checkpoints."""
        places = [(stage.paper_stage, i) for stage in spec.stages for i in range(stage.depth)]
        return [b for b, (paper_stage, i) in enumerate(places) if self.applies(paper_stage, i, b)]


# ---------------------------------------------------------------------------------------
# Weight initialisation, in one place. Each layer initialises itself in its constructor
# (reset_parameters), which is what lets deepspeed.zero.Init partition it right after.
#   linear: truncated normal, std 0.02, zero bias (ViT practice)
#   conv:   normal, std sqrt(2 / fan_out), zero bias (EfficientNet practice)
#   norms:  weight 1, bias 0 (PyTorch's defaults)
#   relative-position tables: zeros, so attention starts position-agnostic


class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Conv2d(nn.Conv2d):
    def reset_parameters(self) -> None:
        fan_out = self.kernel_size[0] * self.kernel_size[1] * self.out_channels // self.groups
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / fan_out))
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with fp32 running statistics and fp32 arithmetic whatever the weights' dtype.

    Under bf16 (deepspeed.zero.Init creates every floating tensor in bf16, buffers included)
    a momentum-0.1 update of a bf16 running mean rounds away, and ranks' statistics summed in
    bf16 lose more. The statistics are turned back to fp32 the first time they are seen in
    another dtype (call `fp32_statistics` before loading a checkpoint into a bf16-built model);
    the input keeps its dtype (PyTorch's CPU and CUDA kernels normalise a bf16 input with fp32
    weights and statistics in fp32), so no fp32 copy of it is saved for backward.
    """

    def fp32_statistics(self) -> None:
        for buffer in (self.running_mean, self.running_var):
            if buffer.dtype != torch.float32:
                buffer.data = buffer.data.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fp32_statistics()
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight.float(), self.bias.float(),
                            self.training, self.momentum, self.eps)


# ---------------------------------------------------------------------------------------
# Blocks


def _pool_nhwc(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling of a channels-last (B, H, W, C) tensor."""
    b, h, w, c = x.shape
    return x.view(b, h // 2, 2, w // 2, 2, c).mean(dim=(2, 4))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = Conv2d(channels, reduced, 1)
        self.expand = Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.gelu(self.reduce(s))))


class MBConv(nn.Module):
    """Pre-norm inverted bottleneck: x + proj(SE(dw(expand(BN(x))))), on (B, C, H, W).

    Expansion 4 of the input width, squeeze-excitation to 1/4 of the input width, stride on
    the depthwise conv; a downsampling block's shortcut is a 1x1 projection of 2x2 pooling.
    """

    def __init__(self, dim_in: int, dim_out: int, stride: int, drop_path: float, expand: int = 4):
        super().__init__()
        hidden = dim_in * expand
        self.stride = stride
        self.shortcut = None
        if stride != 1 or dim_in != dim_out:
            self.shortcut = Conv2d(dim_in, dim_out, 1)
        self.norm = BatchNorm2d(dim_in)
        self.expand = Conv2d(dim_in, hidden, 1, bias=False)
        self.expand_norm = BatchNorm2d(hidden)
        self.depthwise = Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.depthwise_norm = BatchNorm2d(hidden)
        self.se = SqueezeExcite(hidden, max(1, dim_in // 4))
        self.project = Conv2d(hidden, dim_out, 1)
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.stride == 2:
            shortcut = F.avg_pool2d(shortcut, 2)
        if self.shortcut is not None:
            shortcut = self.shortcut(shortcut)
        y = F.gelu(self.expand_norm(self.expand(self.norm(x))))
        y = F.gelu(self.depthwise_norm(self.depthwise(y)))
        y = self.project(self.se(y))
        return shortcut + self.drop_path(y)


def relative_position_index(height: int, width: int) -> torch.Tensor:
    """(N, N) index into a flattened (2H-1)(2W-1) table for every pair of grid positions."""
    coords = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")).flatten(1)
    delta = coords[:, :, None] - coords[:, None, :]  # (2, N, N), each in [-(size-1), size-1]
    return (delta[0] + height - 1) * (2 * width - 1) + (delta[1] + width - 1)


# ---------------------------------------------------------------------------------------
# Attention kernels (model.attention_backend). The relative-position bias reaches
# scaled_dot_product_attention as its additive mask and must get its gradient. In torch 2.14:
#   math: autograd through plain ops; right everywhere, the slowest and an N x N saved tensor;
#   efficient: its backward computes the mask's gradient (CUDA only);
#   cudnn: its backward op returns gradients for q, k and v only, so whether a mask that
#     requires grad keeps its gradient there is for a GPU to show (benchmarks/gpu_proof.py,
#     part attention), and torch 2.11+ gives NaN in grad_q at seq_len % 128 == 64 with a mask
#     on SM90 (pytorch issue 196678): 576 tokens, stage 3 at 384 px;
#   flash: takes no mask that requires grad (CUDA: no mask at all; CPU: no gradient for it).
KERNELS = {
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "math": SDPBackend.MATH,
}
# auto, unmeasured: the kernels known to keep the bias's gradient, fastest first; never cuDNN
# or flash. On a CPU only math qualifies.
SAFE_AUTO = ("efficient", "math")
# auto on a device whose compute capability gpu_proof's attention part measured: the fastest
# kernel right at all six token counts (its `auto_choice`), and the results file showing it,
# e.g. "sm90": ("cudnn", "benchmarks/results/gpu-<date>-<device>.json"). None measured yet.
MEASURED_AUTO: dict[str, tuple[str, str]] = {}


def attention_order(backend: str, device: torch.device | None = None) -> tuple[str, ...]:
    """The kernels `backend` may run, in priority order, on `device` (default: the current CUDA
    device if there is one)."""
    if backend != "auto":
        if backend not in KERNELS:
            raise ValueError(f"unknown attention backend {backend!r}; one of auto, {', '.join(KERNELS)}")
        return (backend,)
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if on_cuda and MEASURED_AUTO:  # asking the capability starts CUDA: only when there is something to look up
        major, minor = torch.cuda.get_device_capability(device)
        measured = MEASURED_AUTO.get(f"sm{major}{minor}")
        if measured:
            return (measured[0], *(k for k in SAFE_AUTO if k != measured[0]))
    return SAFE_AUTO


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
              kernels: tuple[str, ...]) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v on the first of `kernels` that takes these inputs."""
    with sdpa_kernel([KERNELS[k] for k in kernels], set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def kernel_that_ran(output: torch.Tensor) -> str:
    """Which kernel made `output` (an attention output that requires grad), from its grad_fn."""
    name = type(output.grad_fn).__name__
    for kernel, marker in (("efficient", "EfficientAttention"), ("cudnn", "CudnnAttention"), ("flash", "FlashAttention")):
        if marker in name:
            return kernel
    return "math"


def probe_attention(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, tokens: int) -> str:
    """The kernel `backend` runs for one training step's attention on `device` (bias requiring
    grad); a ValueError, naming the key, where no kernel it allows takes these inputs."""
    kernels = attention_order(backend, device)
    q, k, v = (torch.randn(1, 2, tokens, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.zeros(1, 2, tokens, tokens, device=device, dtype=dtype, requires_grad=True)
    try:
        with warnings.catch_warnings():  # torch warns why each refusing kernel refused; the error below says it
            warnings.simplefilter("ignore")
            return kernel_that_ran(attention(q, k, v, bias, kernels))
    except RuntimeError as e:
        raise ValueError(f"model.attention_backend={backend}: no {'/'.join(kernels)} kernel takes this attention on "
                         f"{device.type} in {dtype} (an additive position bias that needs its gradient, head dim "
                         f"{head_dim}): {str(e).splitlines()[0]}; use auto or math") from None


class RelativeAttention(nn.Module):
    """Multi-head self-attention with a learned scalar bias w[i - j] per head, added to the
    logits before the softmax. The bias goes to scaled_dot_product_attention as its additive
    mask, so fused kernels run on a GPU; `backend` picks which (attention_order)."""

    def __init__(self, dim_in: int, dim_out: int, head_dim: int, grid: tuple[int, int], backend: str = "auto"):
        super().__init__()
        if dim_out % head_dim:
            raise ValueError(f"attention width {dim_out} is not a multiple of head dim {head_dim}")
        self.num_heads = dim_out // head_dim
        self.grid = grid
        # Fixed when built (the worker builds on its device): no device query inside compiled code.
        self.kernels = attention_order(backend)
        self.qkv = Linear(dim_in, 3 * dim_out)
        self.proj = Linear(dim_out, dim_out)
        h, w = grid
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_heads, 2 * h - 1, 2 * w - 1))
        # Derived from the grid, so not saved: a checkpoint holds only the resizable table.
        self.register_buffer("relative_position_index", relative_position_index(h, w), persistent=False)

    def relative_bias(self) -> torch.Tensor:
        table = self.relative_position_bias_table.flatten(1)  # (heads, (2H-1)(2W-1))
        return table[:, self.relative_position_index]  # (heads, N, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, C_in)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.relative_bias().to(q.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        y = attention(q, k, v, bias, self.kernels)
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block on channels-last (B, H, W, C) tensors.

    x <- x + attn(LN(x)); x <- x + FFN(LN(x)). A block that downsamples or widens uses
    x <- proj(pool(x)) + attn(pool(LN(x))).
    """

    def __init__(self, dim_in: int, dim_out: int, stride: int, head_dim: int, grid: tuple[int, int], drop_path: float,
                 attention_backend: str = "auto"):
        super().__init__()
        self.stride = stride
        self.shortcut = Linear(dim_in, dim_out) if (stride != 1 or dim_in != dim_out) else None
        self.norm1 = nn.LayerNorm(dim_in)
        self.attn = RelativeAttention(dim_in, dim_out, head_dim, grid, attention_backend)
        self.norm2 = nn.LayerNorm(dim_out)
        self.mlp = nn.Sequential(Linear(dim_out, 4 * dim_out), nn.GELU(), Linear(4 * dim_out, dim_out))
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.stride == 2:
            x, y = _pool_nhwc(x), _pool_nhwc(y)
        if self.shortcut is not None:
            x = self.shortcut(x)
        b, h, w, c = x.shape
        x = x + self.drop_path(self.attn(y.reshape(b, h * w, -1)).view(b, h, w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


@contextlib.contextmanager
def _frozen_batchnorm_stats(block: nn.Module):
    """Momentum 0 while a checkpointed block recomputes, so its BatchNorm running statistics
    are updated once per step, as without checkpointing, not twice."""
    norms = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


# ---------------------------------------------------------------------------------------
# The network


class CoAtNet(nn.Module):
    def __init__(
        self,
        spec: CoAtNetSpec,
        num_classes: int = 1000,
        image_size: int = 224,
        drop_path_rate: float = 0.0,
        checkpointing: Checkpointing = Checkpointing(),
        channels_last: bool = False,
        attention_backend: str = "auto",
    ):
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
        self.spec = spec
        self.image_size = image_size
        self.num_classes = num_classes
        self.checkpointing = checkpointing
        # Convolutions in channels-last (NHWC) memory format: cuDNN's bf16 depthwise kernels run
        # only in it. Only the activations change layout; parameters and checkpoints do not.
        self.channels_last = channels_last
        self.stem = nn.Sequential(
            Conv2d(3, spec.stem_dim, 3, stride=2, padding=1, bias=False),
            BatchNorm2d(spec.stem_dim),
            nn.GELU(),
            Conv2d(spec.stem_dim, spec.stem_dim, 3, padding=1),
        )
        total_blocks = sum(s.depth for s in spec.stages)
        block_index, dim, resolution = 0, spec.stem_dim, image_size // 2
        self.stages = nn.ModuleList()
        for stage in spec.stages:
            blocks = nn.ModuleList()
            for i in range(stage.depth):
                stride = stage.stride if i == 0 else 1
                resolution //= stride
                rate = drop_path_rate * block_index / max(1, total_blocks - 1)
                if stage.kind == "mbconv":
                    blocks.append(MBConv(dim, stage.dim, stride, rate))
                else:
                    grid = (resolution, resolution)
                    blocks.append(TransformerBlock(dim, stage.dim, stride, spec.head_dim, grid, rate, attention_backend))
                dim = stage.dim
                block_index += 1
            self.stages.append(blocks)
        self.norm = nn.LayerNorm(dim)
        # Pre-logits layer (ViT / timm's NormMlpHead): the paper's parameter counts include it.
        self.pre_logits = nn.Sequential(Linear(dim, dim), nn.Tanh())
        self.head = Linear(dim, num_classes)
        self.num_features = dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> pooled, normalised features (B, num_features)."""
        if self.channels_last:  # the stem and MBConv stages keep it: convolutions and BatchNorm preserve it
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        nhwc = False  # Transformer blocks take (B, H, W, C) tensors
        index = 0  # the block's place in the model
        for stage, blocks in zip(self.spec.stages, self.stages):
            if (stage.kind == "transformer") != nhwc:
                nhwc = not nhwc
                x = x.permute(0, 2, 3, 1) if nhwc else x.permute(0, 3, 1, 2)
            for i, block in enumerate(blocks):
                if self.training and self.checkpointing.applies(stage.paper_stage, i, index):
                    contexts = lambda block=block: (contextlib.nullcontext(), _frozen_batchnorm_stats(block))
                    x = checkpoint(block, x, use_reentrant=False, context_fn=contexts)
                else:
                    x = block(x)
                index += 1
        x = x.mean(dim=(1, 2)) if nhwc else x.mean(dim=(2, 3))
        return self.pre_logits(self.norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def create_model(
    name: str,
    num_classes: int = 1000,
    image_size: int = 224,
    drop_path_rate: float = 0.0,
    checkpointing: Checkpointing | None = None,
    channels_last: bool = False,
    attention_backend: str = "auto",
) -> CoAtNet:
    """Build a registered CoAtNet. Use `with torch.device("meta"):` to build without memory."""
    problem = unknown_model(name)
    if problem:
        raise ValueError(f"model.name {name!r}: {problem}")
    return CoAtNet(MODEL_SPECS[name], num_classes, image_size, drop_path_rate, checkpointing or Checkpointing(),
                   channels_last, attention_backend)


def list_models() -> list[str]:
    return list(MODEL_SPECS)


def unknown_model(name: str) -> str | None:
    """Why `name` names no registered model (with the nearest name), or None."""
    if name in MODEL_SPECS:
        return None
    close = difflib.get_close_matches(name, list(MODEL_SPECS), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown model; {hint}registered: {', '.join(MODEL_SPECS)}"


def resize_relative_position(
    model_or_state_dict: nn.Module | dict, new_image_size: int, old_image_size: int | None = None
) -> dict[str, torch.Tensor]:
    """Return a state dict whose relative-position tables are bilinearly resized for a model
    built at `new_image_size`. A model knows its own size; a bare state dict needs
    `old_image_size`. Other entries are returned unchanged (same tensors)."""
    if isinstance(model_or_state_dict, nn.Module):
        old_image_size = model_or_state_dict.image_size
        state = model_or_state_dict.state_dict()
    elif old_image_size is None:
        raise ValueError("resizing a state dict needs old_image_size (the size it was trained at)")
    else:
        state = model_or_state_dict
    for size in (old_image_size, new_image_size):
        if size % 32:
            raise ValueError(f"image sizes must be multiples of 32, got {size}")
    resized = dict(state)
    for key, table in state.items():
        if not key.endswith("relative_position_bias_table") or new_image_size == old_image_size:
            continue
        heads, rows, cols = table.shape
        new_h = (rows + 1) // 2 * new_image_size // old_image_size
        new_w = (cols + 1) // 2 * new_image_size // old_image_size
        # align_corners keeps the zero-offset centre and the extreme offsets on grid points.
        resized[key] = F.interpolate(
            table.unsqueeze(0).float(), size=(2 * new_h - 1, 2 * new_w - 1), mode="bilinear", align_corners=True
        )[0].to(table.dtype)
    return resized


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=64)  # the planner asks again for each candidate batch split
def count_flops(model_name: str, image_size: int = 224, num_classes: int = 1000) -> int:
    """Forward FLOPs for one image (a multiply-add counts as 2), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = create_model(model_name, num_classes=num_classes, image_size=image_size).eval()
        images = torch.empty(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops()
