"""`python -m coatnet_scale.plan --config configs/coatnet7.yaml --gpus 256 --gpu-memory 80GiB`:
will it fit, and how long will a step take, before any money is spent.

Per GPU, under ZeRO-3 with bf16 mixed precision (DeepSpeed's accounting, 18 bytes per
parameter spread over all GPUs): parameters (bf16 shard + fp32 master copy), gradients (fp32
shard) and AdamW moments, plus the gathered working set of the largest layer. Activations
come from the model's own shapes: a forward pass on the meta device records every tensor
saved for backward, block by block, so checkpointing is accounted exactly as configured
(checkpointed blocks keep their input; backward recomputes one block at a time). FLOPs come
from torch's flop counter; step time is at a stated model-FLOPs utilisation.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch

from coatnet_scale.config import add_config_arguments, config_from_arguments
from coatnet_scale.models import Checkpointing, count_flops, count_parameters, create_model

GiB = 2**30
BYTES_PER_PARAM = {"parameters": 2 + 4, "gradients": 4, "optimizer": 8}  # bf16 + fp32 master; fp32; AdamW m, v
RESERVED = 0.10  # allocator fragmentation, communication buffers, CUDA context


@dataclass
class ActivationProfile:
    """Bytes saved for backward for ONE image at the given element size."""

    per_block: list[tuple[int, int, bool]]  # (saved bytes, input bytes, checkpointed) per block
    outside_blocks: int  # stem and head

    def total(self, checkpointing: bool) -> int:
        if not checkpointing:
            return self.outside_blocks + sum(saved for saved, _, _ in self.per_block)
        kept = sum(inp if ckpt else saved for saved, inp, ckpt in self.per_block)
        recompute = max((saved for saved, _, ckpt in self.per_block if ckpt), default=0)
        return self.outside_blocks + kept + recompute


def activation_profile(model_name: str, image_size: int, checkpointing: Checkpointing, element_bytes: int = 2) -> ActivationProfile:
    with torch.device("meta"):
        model = create_model(model_name, image_size=image_size).train()
    current: list[int | None] = [None]
    saved = [0] * sum(len(blocks) for blocks in model.stages)
    inputs = [0] * len(saved)
    outside = [0]
    flags = []
    index = 0
    for stage, blocks in zip(model.spec.stages, model.stages):
        for i, block in enumerate(blocks):
            flags.append(checkpointing.applies(stage.paper_stage, i))

            def enter(module, args, index=index):
                current[0] = index
                inputs[index] = args[0].numel() * element_bytes

            def leave(module, args, output):
                current[0] = None

            block.register_forward_pre_hook(enter)
            block.register_forward_hook(leave)
            index += 1

    parameters = {id(p) for p in model.parameters()}
    counted: dict[int, torch.Tensor] = {}  # by identity; holding them keeps ids from being reused

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(base) in parameters or id(base) in counted:  # weights, or an activation saved twice
            return tensor
        counted[id(base)] = base
        size = base.numel() * (element_bytes if base.is_floating_point() else base.element_size())
        if current[0] is None:
            outside[0] += size
        else:
            saved[current[0]] += size
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.empty(1, 3, image_size, image_size, device="meta", requires_grad=True))
    return ActivationProfile(list(zip(saved, inputs, flags)), outside[0])


def largest_layer_params(model_name: str) -> int:
    with torch.device("meta"):
        model = create_model(model_name)
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def parse_size(text: str) -> int:
    units = {"gib": GiB, "gb": 10**9, "mib": 2**20, "mb": 10**6}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * factor)
    return int(float(lowered))


def plan(config, gpus: int, gpu_memory: int, peak_tflops: float, mfu: float) -> dict:
    m, t = config.model, config.train
    with torch.device("meta"):
        params = count_parameters(create_model(m.name, m.num_classes, m.image_size))
    largest = largest_layer_params(m.name)
    states = {name: bytes_ * params / gpus for name, bytes_ in BYTES_PER_PARAM.items()}
    states["working set (largest layer)"] = 4 * largest
    state_total = sum(states.values())
    policy = Checkpointing(m.checkpointing.every, tuple(m.checkpointing.stages))
    profile = activation_profile(m.name, m.image_size, policy)
    per_image = {"without checkpointing": profile.total(False), "with checkpointing": profile.total(True)}
    configured = per_image["with checkpointing" if policy.every else "without checkpointing"]
    usable = gpu_memory * (1 - RESERVED)
    largest_micro = max(0, math.floor((usable - state_total) / configured))
    forward = count_flops(m.name, m.image_size, m.num_classes)
    passes = 4 if policy.every else 3  # forward + backward (2x), + the recomputed forward
    step_flops = forward * passes * t.global_batch_size
    return {
        "params": params, "states": states, "state_total": state_total, "per_image": per_image,
        "micro_batch": t.micro_batch_size, "activations": configured * t.micro_batch_size,
        "fits": state_total + configured * t.micro_batch_size <= usable, "largest_micro_batch": largest_micro,
        "usable": usable, "step_flops": step_flops, "step_seconds": step_flops / (gpus * peak_tflops * 1e12 * mfu),
        "largest_layer": largest,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coatnet_scale.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job (one worker each)")
    parser.add_argument("--gpu-memory", type=parse_size, default=80 * GiB, help="per GPU, e.g. 80GiB (default)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.45, help="model-FLOPs utilisation to assume (default 0.45)")
    args = parser.parse_args(argv)
    config = config_from_arguments(args)
    r = plan(config, args.gpus, args.gpu_memory, args.peak_tflops, args.mfu)
    m = config.model
    print(f"{m.name} at {m.image_size}px: {r['params'] / 1e9:.3f}B parameters on {args.gpus} GPUs of "
          f"{args.gpu_memory / GiB:.0f} GiB (ZeRO-3, bf16, AdamW)")
    print("per GPU:")
    for name, value in r["states"].items():
        print(f"  {name:<30}{value / GiB:9.2f} GiB")
    print(f"  {'model states in all':<30}{r['state_total'] / GiB:9.2f} GiB")
    for name, value in r["per_image"].items():
        print(f"  activations per image, {name:<22}{value / 2**20:9.1f} MiB")
    print(f"  activations, micro-batch {r['micro_batch']:<16}{r['activations'] / GiB:9.2f} GiB (as configured)")
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    print(f"  {verdict} in {r['usable'] / GiB:.1f} GiB usable ({RESERVED:.0%} reserved); largest micro-batch: {r['largest_micro_batch']}")
    print(f"per step (global batch {config.train.global_batch_size}): {r['step_flops'] / 1e15:.1f} PFLOP; "
          f"{r['step_seconds']:.2f} s at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s per GPU")
    return 0 if r["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
