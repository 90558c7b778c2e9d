"""`model.compile: blocks`: each MBConv and Transformer block compiled by torch.compile (inductor)
as a ZeRO-3 leaf module.

Under ZeRO-3, DeepSpeed gathers a module's parameters in hooks that are
`torch.compiler.disable`d, so a compiled whole model breaks its graph at every module.
`deepspeed.utils.set_z3_leaf_modules` makes each block one unit for DeepSpeed (its hooks gather
and release the whole block's parameters at the block's boundary, none inside), and compiling
the block's `forward` (not the module call) keeps those hooks outside the compiled code.
Activation checkpointing wraps the block call, so a checkpointed block recomputes through the
same compiled forward.

One batch shape. `dynamic=False` compiles a graph per input shape, and past dynamo's
recompile limit a block falls back to eager on that rank alone while the others wait. So only
the training micro-batch is compiled: the loader keeps every training batch at its planned
size (a corrupt sample's place goes to another view of a good one, coatnet_scale/data/loader.py),
and the one batch of another size a loader slot may end its epoch with runs eager, as
evaluation does.
"""
from __future__ import annotations

import os
import shutil

import torch

from coatnet_scale.models.coatnet import MBConv, TransformerBlock

BLOCKS = (MBConv, TransformerBlock)


def compile_problem(use_gpu: bool) -> str | None:
    """Why this installation cannot compile blocks under ZeRO-3, or None."""
    try:
        from deepspeed.utils import set_z3_leaf_modules  # noqa: F401  (DeepSpeed >= 0.13)
    except ImportError:
        return "this DeepSpeed has no deepspeed.utils.set_z3_leaf_modules (needs >= 0.13)"
    if not torch._dynamo.is_dynamo_supported():
        return f"torch {torch.__version__} cannot run torch.compile on this Python"
    if not use_gpu and shutil.which(os.environ.get("CXX", "g++")) is None:
        return "inductor needs a C++ compiler on CPU workers (g++ or $CXX); none found"
    return None


def compile_blocks(model: torch.nn.Module, use_gpu: bool, batch_size: int) -> int:
    """Marks the blocks ZeRO-3 leaves and compiles their forwards for training batches of
    `batch_size`, before deepspeed.initialize (which registers the hooks). Returns how many
    blocks. Raises RuntimeError, one line, where this installation cannot."""
    problem = compile_problem(use_gpu)
    if problem:
        raise RuntimeError(f"model.compile=blocks: {problem}; use model.compile=none")
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, list(BLOCKS))
    # One graph per distinct block shape (first block of a stage, the others; about ten for
    # CoAtNet-7), each again for the recompute of a checkpointed block (BatchNorm momentum 0):
    # more than dynamo's default of 8 recompilations of the one forward code object.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    blocks = [m for m in model.modules() if isinstance(m, BLOCKS)]
    for block in blocks:
        block.forward = _training_only(torch.compile(block.forward, dynamic=False), block.forward, batch_size)
    return len(blocks)


def _training_only(compiled, eager, batch_size: int):
    """The compiled forward for training micro-batches (gradients taken, `batch_size` samples);
    evaluation (no_grad: another graph) and a slot's last batch of another size run eager rather
    than compiling again per block shape."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return compiled(x) if torch.is_grad_enabled() and len(x) == batch_size else eager(x)
    return forward
