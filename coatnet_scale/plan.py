"""`python -m coatnet_scale.plan --config configs/coatnet7.yaml --gpus 256 --gpu-memory 80GiB`:
will it fit, and how long will a step take, before any money is spent.

Per GPU, under ZeRO-3 with bf16 mixed precision (DeepSpeed's accounting, 18 bytes per
parameter spread over all GPUs): parameters (bf16 shard + fp32 master copy), gradients (fp32
shard) and AdamW moments, plus the gathered working set of the largest layer and DeepSpeed's
reduce bucket; the optimizer step's temporaries count when they exceed the activations. Activations
come from the model's own shapes: a whole training step (forward, loss, backward with the
configured checkpointing recomputing its blocks) runs on the meta device under a dispatch mode
that follows every tensor storage from the op that makes it to its last reference, so the
peak holds whatever is alive at that moment: saved tensors, a recomputed block's working set,
activation gradients, temporaries (docs/planning.md). FLOPs come from torch's flop counter;
step time is at a stated model-FLOPs utilisation. The network section counts what ZeRO-3 (and
hpZ) sends per step, by replaying DeepSpeed's parameter coordinator on the model's module order,
and sets the communication time against the compute time (docs/planning.md).
"""
from __future__ import annotations

import argparse
import bisect
import collections
import functools
import math
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from coatnet_scale.batch import batch_plan
from coatnet_scale.config import add_config_arguments, config_from_arguments
from coatnet_scale.models import MODEL_SPECS, Checkpointing, count_flops, count_parameters, create_model
from coatnet_scale.models.coatnet import MBConv, TransformerBlock
from coatnet_scale.plan_checkpointing import BlockCost, block_costs, choose_blocks, describe_blocks

GiB = 2**30
BYTES_PER_PARAM = {"parameters": 2 + 4, "gradients": 4, "optimizer": 8}  # bf16 + fp32 master; fp32; AdamW m, v
RESERVED = 0.10  # allocator fragmentation, communication buffers, CUDA context
BLOCK_KINDS = {"mbconv": MBConv, "transformer": TransformerBlock}


# Memory a kernel takes inside itself, invisible at the tensor level, measured per device.
# oneDNN's convolution backward on CPU holds a copy of its input and of its output gradient
# (blocked-layout reorders) while it runs (torch.profiler's allocator events, docs/planning.md).
# On CUDA none is modelled yet: cuDNN's workspace is not, and the meta device runs the math
# attention, which keeps the N x N probabilities a fused kernel does not.
HIDDEN_WORKSPACE = {
    "cpu": {torch.ops.aten.convolution_backward.default: lambda size, args: size(args[0]) + size(args[1])},
    "cuda": {},
}


# Transient bytes per element of an optimizer sub-group while it steps, on top of the model
# states: DeepSpeed's ZeRO-3 concatenates the sub-group's gradients into one fp32 tensor, and
# torch's AdamW makes a full-size sqrt(v) (foreach on GPUs; on CPU its single-tensor loop holds
# the sqrt and its quotient at once: 8 partition-sized fp32 tensors alive at the step's peak in a
# measured fp32 run). DeepSpeed steps one sub-group at a time.
OPTIMIZER_STEP_BYTES = {"cuda": 4 + 4, "cpu": 4 + 8}
SUB_GROUP_SIZE = 1_000_000_000  # zero_optimization.sub_group_size, DeepSpeed's default


def optimizer_step_bytes(params: int, world_size: int, device: str = "cuda") -> int:
    """Per-GPU transient bytes of the optimizer step beyond the model states."""
    return OPTIMIZER_STEP_BYTES[device] * min(math.ceil(params / world_size), SUB_GROUP_SIZE)


# Compiled blocks (model.compile: blocks) keep less for backward than eager ones (inductor fuses
# the elementwise chains, saving fewer intermediates), which the meta-device replay below, of
# eager ops, cannot see. Per block kind: compiled activation bytes over eager, and where that was
# measured (a results file of benchmarks/gpu_proof.py, its compiled row's peak against the
# planner's). UNSET until a GPU measures them: the planner then plans compiled blocks with eager
# figures, and says so.
COMPILED_ACTIVATION_FACTORS: dict[str, tuple[float, str] | None] = {"mbconv": None, "transformer": None}
EAGER_NOTE = "compiled activation memory: no GPU measurement yet; planning with eager figures"


def compiled_factors(model_config, factors: dict[str, float] | None = None
                     ) -> tuple[tuple[tuple[str, float], ...], str | None]:
    """(the per-kind factors to plan `model_config` with, the line saying so): `factors` where
    given, else the measured table's once every kind has one; () plans eager. The line is None
    when model.compile is not blocks."""
    if model_config.compile != "blocks":
        return (), None
    if factors is not None:
        return tuple(sorted(factors.items())), "compiled activation memory: " + ", ".join(
            f"{kind} x{f:.2f} (given, not measured)" for kind, f in sorted(factors.items()))
    if any(v is None for v in COMPILED_ACTIVATION_FACTORS.values()):
        return (), EAGER_NOTE
    table = sorted(COMPILED_ACTIVATION_FACTORS.items())
    return tuple((kind, f) for kind, (f, _) in table), "compiled activation memory: " + ", ".join(
        f"{kind} x{f:.2f} (measured: {source})" for kind, (f, source) in table)


@dataclass
class ActivationProfile:
    """Activation memory of one training step: the highest point, over forward and backward, of
    what is alive besides the model states (parameters, gradients once accumulated, optimizer
    states). What is alive after each op is `fixed + per_image x batch`; the peak is the highest
    of those lines at the batch asked for (the peak moves: at batch 1 a large layer's weight
    gradient can set it, at batch 16 a recomputed block). Keyed by checkpointing (False: none,
    True: the policy it was measured with)."""

    lines: dict[bool, list[tuple[int, int]]]  # (fixed, per_image): the upper envelope of all ops

    def total(self, checkpointing: bool, batch: int = 1) -> int:
        return max(fixed + per_image * batch for fixed, per_image in self.lines[checkpointing])

    def per_image(self, checkpointing: bool) -> int:
        """Bytes each further image adds at large batches."""
        return max(per_image for _, per_image in self.lines[checkpointing])

    def largest_batch(self, checkpointing: bool, budget: float) -> int:
        """The largest batch whose activations fit in `budget` bytes."""
        return max(0, min(math.floor((budget - fixed) / per_image) for fixed, per_image in self.lines[checkpointing]
                          if per_image > 0))


class _LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages made under it after every op (views share their base's
    storage), floating-point ones counted at `element_bytes`."""

    def __init__(self, element_bytes: int, workspace: dict):
        super().__init__()
        self.element_bytes, self.workspace = element_bytes, workspace
        self.scale = 1.0  # inside a compiled block's forward: its kind's factor
        self.live: dict[int, tuple[int, weakref.ref | None]] = {}
        self.now = 0
        self.trace: list[int] = []

    def size(self, tensor: torch.Tensor) -> int:
        nbytes = tensor.untyped_storage().nbytes()
        nbytes = nbytes // tensor.element_size() * self.element_bytes if tensor.is_floating_point() else nbytes
        return round(nbytes * self.scale)

    def exclude(self, tensor: torch.Tensor) -> None:
        """A model state from now on (a parameter, or a gradient once accumulated)."""
        key = id(tensor.untyped_storage())
        size, ref = self.live.get(key, (0, None))
        self.now -= size
        self.live[key] = (0, ref)

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and id(tensor.untyped_storage()) not in self.live:
                storage, size = tensor.untyped_storage(), self.size(tensor)
                self.live[id(storage)] = (size, weakref.ref(storage, lambda _, key=id(storage): self._freed(key)))
                self.now += size
        hidden = self.workspace.get(func)
        self.trace.append(self.now + (hidden(self.size, args) if hidden else 0))
        return out


def _step_trace(model, batch: int, element_bytes: int, device: str, factors: tuple = ()) -> list[int]:
    """Activation bytes alive after each op of forward, loss and backward, run on the meta device;
    what a block's forward makes counted at its kind's compiled factor (`compiled_factors`)."""
    mode = _LiveBytes(element_bytes, HIDDEN_WORKSPACE[device])
    for state in [*model.parameters(), *model.buffers()]:
        mode.exclude(state)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: mode.exclude(p.grad)) for p in model.parameters()]
    for kind, factor in factors:
        for block in (b for stage in model.stages for b in stage if isinstance(b, BLOCK_KINDS[kind])):
            hooks.append(block.register_forward_pre_hook(lambda m, a, f=factor: setattr(mode, "scale", f)))
            hooks.append(block.register_forward_hook(lambda m, a, o: setattr(mode, "scale", 1.0)))
    with mode:
        images = torch.empty(batch, 3, model.image_size, model.image_size, device="meta")
        targets = torch.empty(batch, model.num_classes, device="meta")  # soft targets, as the pipeline gives
        F.cross_entropy(model(images), targets).backward()
    for hook in hooks:
        hook.remove()
    for p in model.parameters():
        p.grad = None
    return mode.trace


def _envelope(lines: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """The lines that are highest somewhere at batch >= 1 (the others never set the peak)."""
    kept: list[tuple[int, int]] = []
    for fixed, per_image in sorted(lines, key=lambda line: (-line[1], -line[0])):  # steepest first
        if not kept or all(fixed + per_image > f + s for f, s in kept):
            kept.append((fixed, per_image))
    return kept


def activation_profile(model_name: str, image_size: int, checkpointing: Checkpointing, element_bytes: int = 2,
                       num_classes: int = 1000, device: str = "cuda", factors: tuple = ()) -> ActivationProfile:
    """Activation memory of a training step, without checkpointing and with `checkpointing`,
    floating-point tensors at `element_bytes` (2: bf16). `device` names whose kernels' hidden
    workspace is added (HIDDEN_WORKSPACE): "cuda" or "cpu"; `factors`: compiled blocks'
    (`compiled_factors`; () for eager)."""
    none = activation_lines(model_name, image_size, Checkpointing(), element_bytes, num_classes, device, factors)
    if not checkpointing.enabled:
        return ActivationProfile({False: none, True: none})
    return ActivationProfile({False: none, True: activation_lines(model_name, image_size, checkpointing, element_bytes,
                                                                  num_classes, device, factors)})


@functools.lru_cache(maxsize=256)
def activation_lines(model_name: str, image_size: int, checkpointing: Checkpointing, element_bytes: int = 2,
                     num_classes: int = 1000, device: str = "cuda", factors: tuple = ()) -> list[tuple[int, int]]:
    """`ActivationProfile.lines` of one policy. The step runs at batch 2 and 3 (batch 1 skips a
    few copies): every tensor's size is affine in the batch, so the two traces give each op's line."""
    if device not in HIDDEN_WORKSPACE:
        raise ValueError(f"device must be one of {', '.join(HIDDEN_WORKSPACE)}, got {device!r}")
    with torch.device("meta"):
        model = create_model(model_name, num_classes, image_size, checkpointing=checkpointing).train()
    two, three = (_step_trace(model, batch, element_bytes, device, factors) for batch in (2, 3))
    assert len(two) == len(three), "the step ran different ops at batch 2 and 3"
    return _envelope({(3 * a - 2 * b, b - a) for a, b in zip(two, three)})


@functools.lru_cache(maxsize=256)
def activation_peak(model_name: str, image_size: int, checkpointing: Checkpointing, batch: int, element_bytes: int = 2,
                    num_classes: int = 1000, device: str = "cuda", factors: tuple = ()) -> int:
    """The activation peak of a step at this batch, from one replay (`activation_lines` takes two)."""
    with torch.device("meta"):
        model = create_model(model_name, num_classes, image_size, checkpointing=checkpointing).train()
    return max(_step_trace(model, batch, element_bytes, device, factors))


def largest_layer_params(model_name: str, num_classes: int = 1000) -> int:
    with torch.device("meta"):
        model = create_model(model_name, num_classes)
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def parse_size(text: str) -> int:
    units = {"gib": GiB, "gb": 10**9, "mib": 2**20, "mb": 10**6}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * factor)
    return int(float(lowered))


def model_states(params: int, largest_layer: int, world_size: int, dtype_bytes: int = 2,
                 reduce_bucket_size: int = 50_000_000) -> dict[str, float]:
    """Per-GPU bytes of ZeRO-3's model states: the partitions (BYTES_PER_PARAM for bf16; an
    fp32 run keeps 4-byte parameters beside the fp32 master), the gathered largest layer, and
    the gradient reduce bucket DeepSpeed allocates whole (deepspeed.reduce_bucket_size
    elements in the working dtype: 191 MiB measured in an fp32 run at the default)."""
    per_param = {**BYTES_PER_PARAM, "parameters": dtype_bytes + 4}
    states = {name: bytes_ * params / world_size for name, bytes_ in per_param.items()}
    states["working set (largest layer)"] = 2 * dtype_bytes * largest_layer  # gathered weights + their gradients
    states["reduce bucket"] = dtype_bytes * reduce_bucket_size
    return states


def hpz_copy_bytes(params: int, hpz: int, dtype_bytes: int = 2) -> float:
    """hpZ's secondary copy of the working parameters, partitioned over `hpz` GPUs only: made
    by the forward's gathers, dropped after the optimizer step (DeepSpeed's
    invalidate_secondary_tensor), so it counts beside the activations, not the step."""
    return dtype_bytes * params / hpz if hpz > 1 else 0.0


def predicted_allocated_bytes(model_name: str, image_size: int, micro_batch: int, checkpointing: Checkpointing,
                              dtype_bytes: int = 2, world_size: int = 1, num_classes: int = 1000,
                              reduce_bucket_size: int = 50_000_000, device: str = "cuda", factors: tuple = ()) -> int:
    """The planner's peak allocated bytes per GPU for a ZeRO-3 training step (AdamW, mixed
    precision with `dtype_bytes` per activation and working weight, 2 for bf16) at this
    micro-batch, without hpZ: model states (`model_states`) plus the higher of the activation
    peak (`activation_profile`) and the optimizer step's temporaries (`optimizer_step_bytes`),
    BEFORE the fragmentation reserve (RESERVED) that `plan` holds back. Compare it with
    torch.cuda.max_memory_allocated() over a step after the first."""
    with torch.device("meta"):
        params = count_parameters(create_model(model_name, num_classes, image_size))
    states = model_states(params, largest_layer_params(model_name, num_classes), world_size, dtype_bytes,
                          reduce_bucket_size)
    profile = activation_profile(model_name, image_size, checkpointing, dtype_bytes, num_classes, device, factors)
    activations = profile.total(checkpointing.enabled, micro_batch)
    transient = max(activations, optimizer_step_bytes(params, world_size, device))
    return round(sum(states.values()) + transient)


def plan(config, gpus: int, gpu_memory: int, peak_tflops: float, mfu: float,
         factors: dict[str, float] | None = None) -> dict:
    """Memory and time of a step of `config` on `gpus` GPUs; `factors`: compiled blocks'
    activation factors per kind to plan with instead of the measured table's (`compiled_factors`)."""
    m, t = config.model, config.train
    compiled, note = compiled_factors(m, factors)
    with torch.device("meta"):
        params = count_parameters(create_model(m.name, m.num_classes, m.image_size))
    largest = largest_layer_params(m.name, m.num_classes)
    states = model_states(params, largest, gpus, reduce_bucket_size=config.deepspeed.reduce_bucket_size)
    state_total = sum(states.values())
    choice = checkpointing_policy(config, gpus, gpu_memory, factors=factors)
    policy = choice.policy
    profile = activation_profile(m.name, m.image_size, policy, num_classes=m.num_classes, factors=compiled)
    checkpointed = policy.enabled
    per_image = {"without checkpointing": profile.per_image(False), "with checkpointing": profile.per_image(True)}
    activations = profile.total(checkpointed, t.micro_batch_size)
    hpz_copy = hpz_copy_bytes(params, config.deepspeed.zero_hpz_partition_size)
    optimizer_step = optimizer_step_bytes(params, gpus)
    allocated = state_total + max(activations + hpz_copy, optimizer_step)
    usable = gpu_memory * (1 - RESERVED)
    largest_micro = 0
    if state_total + max(optimizer_step, hpz_copy) <= usable:
        largest_micro = profile.largest_batch(checkpointed, usable - state_total - hpz_copy)
    forward = count_flops(m.name, m.image_size, m.num_classes)
    step_flops = 3 * forward * t.global_batch_size  # model FLOPs: forward + backward (2x), as MFU counts them
    # + the forward of each checkpointed block, once more (the stem and head never recompute)
    costs = block_costs(m.name, m.image_size, m.num_classes)
    recomputed = sum(costs[b].flops for b in policy.chosen(MODEL_SPECS[m.name]))
    hardware_flops = (3 * forward + recomputed) * t.global_batch_size
    return {
        "params": params, "states": states, "state_total": state_total, "per_image": per_image,
        "micro_batch": t.micro_batch_size, "activations": activations, "hpz_copy": hpz_copy, "optimizer_step": optimizer_step,
        "allocated": allocated, "fits": allocated <= usable, "largest_micro_batch": largest_micro,
        "usable": usable, "step_flops": step_flops, "step_seconds": step_flops / (gpus * peak_tflops * 1e12 * mfu),
        "hardware_flops": hardware_flops, "hfu": mfu * hardware_flops / step_flops,
        "largest_layer": largest, "checkpointing": choice, "compiled_memory": note,
    }


# -- activation checkpointing: as configured, or the fewest blocks that fit (auto) ------------


@dataclass
class CheckpointingChoice:
    policy: Checkpointing
    auto: bool
    described: str  # which blocks, by stage
    activations: int | None = None  # auto: the predicted activation peak at the micro-batch
    budget: float | None = None  # auto: what the activations could take
    note: str | None = None  # model.compile=blocks: which activation figures it planned with


def configured_checkpointing(model_config) -> Checkpointing | None:
    """The models' record of `model.checkpointing` as set; None for auto (the planner decides)."""
    c = model_config.checkpointing
    return None if c == "auto" else Checkpointing(c.every, tuple(c.stages))


def checkpointing_policy(config, world_size: int, device_memory: float, device: str = "cuda",
                         element_bytes: int = 2, factors: dict[str, float] | None = None) -> CheckpointingChoice:
    """The configured policy or, for `model.checkpointing: auto`, the fewest blocks (most
    activation bytes freed per recomputed FLOP first, plan_checkpointing) whose predicted step
    fits `device_memory` less the reserve at the configured micro-batch, beside the model states
    (and hpZ's copy) of `world_size` GPUs. A ValueError, one line, when even every block does not."""
    m = config.model
    spec = MODEL_SPECS[m.name]
    configured = configured_checkpointing(m)
    compiled, note = compiled_factors(m, factors)
    if configured is not None:
        return CheckpointingChoice(configured, False, describe_blocks(spec, tuple(configured.chosen(spec))), note=note)
    with torch.device("meta"):
        params = count_parameters(create_model(m.name, m.num_classes, m.image_size))
    ds, micro = config.deepspeed, config.train.micro_batch_size
    states = sum(model_states(params, largest_layer_params(m.name, m.num_classes), world_size, element_bytes,
                              ds.reduce_bucket_size).values())
    usable = device_memory * (1 - RESERVED)
    budget = usable - states - hpz_copy_bytes(params, ds.zero_hpz_partition_size, element_bytes)

    def peak(policy: Checkpointing) -> int:
        return activation_peak(m.name, m.image_size, policy, micro, element_bytes, m.num_classes, device, compiled)

    chosen = None
    if states + optimizer_step_bytes(params, world_size, device) <= usable:
        costs = compiled_costs(block_costs(m.name, m.image_size, m.num_classes, element_bytes), spec, compiled)
        chosen = choose_blocks(costs, micro, peak, budget)
    if chosen is None:
        raise ValueError(f"model.checkpointing=auto: {m.name} at micro-batch {micro} DOES NOT FIT in {usable / GiB:.3g} "
                         f"GiB usable ({device_memory / GiB:.3g} GiB less {RESERVED:.0%}) on {world_size} GPUs even with "
                         f"every block checkpointed; lower train.micro_batch_size or add GPUs")
    blocks, activations = chosen
    return CheckpointingChoice(Checkpointing(blocks=blocks), True, describe_blocks(spec, blocks), activations, budget,
                               note)


def compiled_costs(costs: tuple[BlockCost, ...], spec, factors: tuple) -> tuple[BlockCost, ...]:
    """Each block's bytes freed by checkpointing it, at its kind's compiled factor."""
    if not factors:
        return costs
    kinds = [stage.kind for stage in spec.stages for _ in range(stage.depth)]
    return tuple(BlockCost(round(c.freed * dict(factors)[kind]), c.flops) for c, kind in zip(costs, kinds))


def describe_choice(choice: CheckpointingChoice, spec) -> str:
    """`activation checkpointing: auto, K of N blocks (...)`, as the plan and the worker print it."""
    total = sum(stage.depth for stage in spec.stages)
    count = len(choice.policy.chosen(spec))
    line = f"activation checkpointing: {'auto' if choice.auto else 'as configured'}, {count} of {total} blocks ({choice.described})"
    if choice.auto:
        line += f"; predicted activation peak {choice.activations / GiB:.2f} GiB of {choice.budget / GiB:.2f} GiB left for them"
    return line + (f"\n{choice.note}" if choice.note else "")


# -- network: what ZeRO-3 sends per step ------------------------------------------------------


@dataclass
class GatherProfile:
    """Parameter elements ZeRO-3 all-gathers in one forward and backward pass (one micro-step)."""

    total: int  # every parameter
    persistent: int  # small ones every GPU keeps whole (stage3_param_persistence_threshold)
    first: int  # gathered for their first use: every other parameter
    again: int  # gathered again later in the pass, having been released in between


def gather_profile(model_name: str, image_size: int, num_classes: int, checkpointing: Checkpointing, ds) -> GatherProfile:
    """Replays DeepSpeed's ZeRO-3 parameter coordinator (PartitionedParameterCoordinator, with
    `ds` its settings: a DeepSpeedConfig) on the order in which one forward and backward pass
    runs the model's modules, recorded on the meta device (checkpointed blocks recompute their
    forward inside the backward, as in training).

    A module's parameters are gathered when it runs unless held, and each run prefetches the
    next parameters in that order up to stage3_prefetch_bucket_size elements (held ones are
    passed over for free). After a module runs its parameters are released unless the
    prefetcher has already passed a later use of them, or they are used again by a module that
    starts within stage3_max_reuse_distance parameter elements. Parameters of at most
    stage3_param_persistence_threshold elements are never released; DeepSpeed gathers them
    once per optimizer step, after it."""
    with torch.device("meta"):
        model = create_model(model_name, num_classes, image_size, 0.0, checkpointing).train()
    modules = list(model.modules())  # DeepSpeed hooks them all; each run is a step of its trace and prefetches
    events: list[tuple[bool, torch.nn.Module]] = []  # (True: runs, False: done), in order
    for m in modules:
        m.register_forward_pre_hook(lambda m, args: events.append((True, m)))
        m.register_forward_hook(lambda m, args, out: events.append((False, m)))
        m.register_full_backward_pre_hook(lambda m, grad: events.append((True, m)))
        m.register_full_backward_hook(lambda m, grad_in, grad_out: events.append((False, m)))
    model(torch.empty(1, 3, image_size, image_size, device="meta", requires_grad=True)).sum().backward()

    params = {m: list(m.parameters(recurse=False)) for m in modules}
    persistent = {p for ps in params.values() for p in ps if p.numel() <= ds.stage3_param_persistence_threshold}
    order = [m for runs, m in events if runs]  # DeepSpeed's trace: one step per module run
    reach = [0]  # reach[j]: parameter elements of order[:j]
    for m in order:
        reach.append(reach[-1] + sum(p.numel() for p in params[m]))
    queue = collections.deque((p, step) for step, m in enumerate(order) for p in params[m])
    fetched_for = collections.defaultdict(lambda: -1)  # the latest use of each that the queue has passed
    held, seen, counts = set(persistent), set(), [0, 0]
    step, live = 0, 0

    def gather(ps) -> None:
        nonlocal live
        for p in ps:
            if p not in held:
                counts[p in seen] += p.numel()
                live += p.numel()
                held.add(p)
                seen.add(p)

    for runs, m in events:
        if not runs:
            window_end = bisect.bisect_left(reach, reach[step] + ds.stage3_max_reuse_distance, lo=step)
            reused = {p for later in order[step:window_end] for p in params[later]}
            for p in params[m]:
                if p not in persistent and p in held and fetched_for[p] <= step and p not in reused:
                    held.discard(p)
                    live -= p.numel()
            continue
        gather(params[m])
        due = [p for p in params[m] if fetched_for[p] < step]  # not yet passed by the prefetcher
        for _ in due:
            p, used = queue.popleft()
            fetched_for[p] = used
        budget, prefetch, size = min(ds.stage3_max_live_parameters - live, ds.stage3_prefetch_bucket_size), {}, 0
        while queue and size < budget:
            p, used = queue.popleft()
            fetched_for[p] = max(fetched_for[p], used)
            if p not in held and p not in prefetch:
                prefetch[p] = None
                size += p.numel()
        gather(prefetch)
        step += 1
    total = sum(p.numel() for ps in params.values() for p in ps)
    return GatherProfile(total, sum(p.numel() for p in persistent), counts[0], counts[1])


@dataclass
class Collective:
    what: str
    group: int  # GPUs taking part
    bytes: float  # the logical message: the whole gathered (or reduced) tensor
    count: int  # per optimizer step


def zero3_collectives(profile: GatherProfile, gpus: int, hpz: int, micro_steps: int, element_bytes: int) -> list[Collective]:
    """ZeRO-3's collectives per optimizer step, as DeepSpeed issues them: parameters gathered
    in each micro-step's forward and (those released since) backward, the persistent ones once
    after the step, gradients reduce-scattered each micro-step. With hpZ, the first forward
    gather of a step goes over every GPU and leaves a secondary copy in each group of `hpz`
    GPUs, which serves every later gather until the optimizer step changes the weights."""
    inner = hpz if hpz > 1 else gpus
    rows = [Collective("parameters, all-gather", gpus, profile.first * element_bytes, 1),
            Collective("parameters, later micro-steps", inner, profile.first * element_bytes, micro_steps - 1),
            Collective("parameters, all-gather again", inner, profile.again * element_bytes, micro_steps),
            Collective("persistent parameters, after the step", gpus, profile.persistent * element_bytes, 1),
            Collective("gradients, reduce-scatter", gpus, profile.total * element_bytes, micro_steps)]
    return [row for row in rows if row.count and row.bytes and row.group > 1]


def network(config, gpus: int, gpus_per_node: int, intra_gbps: float, inter_gbps: float, compute_seconds: float,
            profile: GatherProfile | None = None, checkpointing: Checkpointing | None = None) -> dict:
    """Bytes each GPU sends (and, the collectives being symmetric, receives) per optimizer step,
    the time they take, and the step time against the compute time.

    A collective of message M over n GPUs moves M (n-1)/n bytes in and out of each GPU (ring
    algorithms); it runs at the inter-node bandwidth per GPU when its group spans nodes, else
    at the intra-node one. With deepspeed.overlap_comm the step is assumed to overlap
    communication with compute entirely (step = the larger); without, to add them."""
    m, t, ds = config.model, config.train, config.deepspeed
    hpz = ds.zero_hpz_partition_size
    if gpus % hpz or (gpus_per_node % hpz and gpus > gpus_per_node):
        raise ValueError(f"deepspeed.zero_hpz_partition_size={hpz} must divide --gpus {gpus} and --gpus-per-node {gpus_per_node}")
    batch = batch_plan(t, gpus, gpus)  # as the worker group runs it (coatnet_scale/batch.py)
    per_gpu, micro = batch.global_batch_size // gpus, batch.micro_batch_size
    element_bytes = 2 if (config.cluster.use_gpu if ds.bf16 is None else ds.bf16) else 4
    if profile is None:
        profile = gather_profile(m.name, m.image_size, m.num_classes, checkpointing or configured_checkpointing(m), ds)
    rows = []
    for c in zero3_collectives(profile, gpus, hpz, per_gpu // micro, element_bytes):
        spans_nodes = c.group > gpus_per_node
        traffic = c.count * c.bytes * (c.group - 1) / c.group
        seconds = traffic / ((inter_gbps if spans_nodes else intra_gbps) * 1e9 / 8)
        rows.append({"collective": c, "traffic": traffic, "inter_node": spans_nodes, "seconds": seconds})
    comm = sum(r["seconds"] for r in rows)
    step = max(compute_seconds, comm) if ds.overlap_comm else compute_seconds + comm
    return {
        "rows": rows, "micro_batch": micro, "micro_steps": per_gpu // micro, "element_bytes": element_bytes,
        "traffic": sum(r["traffic"] for r in rows), "inter_node": sum(r["traffic"] for r in rows if r["inter_node"]),
        "comm_seconds": comm, "compute_seconds": compute_seconds, "step_seconds": step,
        "bound": "communication" if comm > compute_seconds else "compute", "hpz": hpz,
        "hpz_copy_bytes": profile.total * element_bytes / hpz if hpz > 1 else 0, "profile": profile,
    }


def print_network(n: dict, gpus: int, gpus_per_node: int, intra_gbps: float, inter_gbps: float, overlap: bool) -> None:
    hpz = f"hpZ groups of {n['hpz']}" if n["hpz"] > 1 else "no hpZ"
    print(f"network per GPU per step ({gpus // gpus_per_node or 1} nodes of {min(gpus, gpus_per_node)} GPUs, {hpz}, "
          f"{n['micro_steps']} micro-step(s) of {n['micro_batch']}, {8 * n['element_bytes']}-bit; "
          f"{inter_gbps:g} Gbit/s per GPU between nodes, {intra_gbps:g} inside one):")
    print(f"  {'collective':<40}{'GPUs':>6}{'count':>7}{'message':>11}{'sent = received':>17}{'time':>9}")
    for r in n["rows"]:
        c = r["collective"]
        print(f"  {c.what:<40}{c.group:>6}{c.count:>7}{c.bytes / 1e9:>9.2f}GB{r['traffic'] / 1e9:>15.2f}GB"
              f"{r['seconds']:>8.3f}s")
    print(f"  {'in all':<64}{n['traffic'] / 1e9:>15.2f}GB{n['comm_seconds']:>8.3f}s  "
          f"({n['inter_node'] / 1e9:.2f} GB between nodes)")
    if n["hpz_copy_bytes"]:
        print(f"  hpZ secondary copy of the parameters: {n['hpz_copy_bytes'] / GiB:.2f} GiB per GPU more memory")
    how = "overlapped (deepspeed.overlap_comm): step = the larger" if overlap else "not overlapped: step = the sum"
    print(f"  step {n['step_seconds']:.3f} s = compute {n['compute_seconds']:.3f} s and communication "
          f"{n['comm_seconds']:.3f} s {how}; {n['bound']}-bound")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coatnet_scale.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job (one worker each)")
    parser.add_argument("--gpu-memory", type=parse_size,
                        help="per GPU, e.g. 141GiB (default: the config's cluster.gpu_memory, else 80GiB)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.34,
                        help="model FLOPs utilisation to assume: model FLOPs (3x the forward, recomputation not "
                             "counted) over peak (default 0.34: torchtitan's Llama 3.1 8B on H100 reaches 33-39%%)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--intra-node-gbps", type=float, default=3600.0,
                        help="Gbit/s per GPU, each way, inside a node (default 3600: NVLink 4, 450 GB/s)")
    parser.add_argument("--inter-node-gbps", type=float, default=400.0,
                        help="Gbit/s per GPU, each way, between nodes (default 400: p5's 3200 Gbit/s EFA per 8 GPUs)")
    args = parser.parse_args(argv)
    config = config_from_arguments(args)
    if args.gpu_memory is None:
        args.gpu_memory = round((config.cluster.gpu_memory or 80) * GiB)
    try:
        r = plan(config, args.gpus, args.gpu_memory, args.peak_tflops, args.mfu)
    except ValueError as e:  # model.checkpointing=auto found nothing that fits
        print(f"plan: {e}")
        return 1
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
    print(f"  {describe_choice(r['checkpointing'], MODEL_SPECS[m.name])}")
    if r["hpz_copy"]:
        print(f"  {'hpZ secondary copy':<30}{r['hpz_copy'] / GiB:9.2f} GiB (forward and backward, beside the activations)")
    print(f"  {'optimizer step (transient)':<30}{r['optimizer_step'] / GiB:9.2f} GiB (after the backward: the higher counts)")
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    print(f"  {verdict} in {r['usable'] / GiB:.1f} GiB usable ({RESERVED:.0%} reserved); largest micro-batch: {r['largest_micro_batch']}")
    print(f"per step (global batch {config.train.global_batch_size}): {r['step_flops'] / 1e15:.1f} PFLOP of model FLOPs "
          f"({r['hardware_flops'] / 1e15:.1f} with the recomputation); {r['step_seconds']:.2f} s at {args.mfu:.0%} MFU "
          f"(hardware FLOP utilisation {r['hfu']:.0%}) of {args.peak_tflops:g} TFLOP/s per GPU")
    try:
        n = network(config, args.gpus, args.gpus_per_node, args.intra_node_gbps, args.inter_node_gbps, r["step_seconds"],
                    checkpointing=r["checkpointing"].policy)
        print_network(n, args.gpus, args.gpus_per_node, args.intra_node_gbps, args.inter_node_gbps,
                      config.deepspeed.overlap_comm)
    except ValueError as e:  # a layout the network model does not cover; the memory verdict stands
        print(f"network: not estimated: {e}")
        return 0 if r["fits"] else 1
    print_recommendation(recommend(config, args, r, n))
    return 0 if r["fits"] else 1


# -- recommending: the batch split and hpZ that make this cluster's step fastest -----------------


def with_overrides(config, overrides: dict):
    """`config` with `section.key` values set, as `--set` would (validated again)."""
    data = config.model_dump()
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        data[section][name] = value
    return type(config).model_validate(data)


def recommend(config, args, current: dict, current_net: dict) -> dict:
    """Over every micro-batch that divides one GPU's share of the global batch and fits in
    memory, with hpZ off and one group per node: the fastest predicted step; among equally
    fast ones (compute-bound), the least communication, then the least memory. Returns the
    overrides that differ from what the group runs now, and the step before and after."""
    t, gpus = config.train, args.gpus
    per_gpu = batch_plan(t, gpus, gpus).global_batch_size // gpus
    now = {"train.micro_batch_size": current_net["micro_batch"], "train.grad_accum_steps": current_net["micro_steps"],
           "deepspeed.zero_hpz_partition_size": current_net["hpz"]}
    hpz_choices = {1, current_net["hpz"]}
    if gpus > args.gpus_per_node and gpus % args.gpus_per_node == 0:
        hpz_choices.add(args.gpus_per_node)
    best = None
    for hpz in sorted(hpz_choices):
        for micro in (d for d in range(1, per_gpu + 1) if per_gpu % d == 0):
            choice = {"train.micro_batch_size": micro, "train.grad_accum_steps": per_gpu // micro,
                      "deepspeed.zero_hpz_partition_size": hpz}
            candidate = with_overrides(config, {**choice, "cluster.num_workers": gpus})
            try:
                r = plan(candidate, gpus, args.gpu_memory, args.peak_tflops, args.mfu)
            except ValueError:  # model.checkpointing=auto: no choice of blocks fits this micro-batch
                continue
            if not r["fits"]:
                continue
            n = network(candidate, gpus, args.gpus_per_node, args.intra_node_gbps, args.inter_node_gbps,
                        r["step_seconds"], profile=current_net["profile"])
            key = (round(n["step_seconds"], 3), round(n["comm_seconds"], 3), r["allocated"])
            if best is None or key < best[0]:
                best = (key, choice, n)
    if best is None:
        return {"overrides": {}, "before": current_net, "after": None}
    _, choice, after = best
    overrides = {k: v for k, v in choice.items() if now[k] != v}
    if overrides and config.cluster.num_workers != gpus:
        overrides = {"cluster.num_workers": gpus, **overrides}
    if after["step_seconds"] >= current_net["step_seconds"] - 5e-4:  # no faster: keep what runs
        overrides, after = {}, current_net
    return {"overrides": overrides, "before": current_net, "after": after}


def print_recommendation(rec: dict) -> None:
    before, after = rec["before"], rec["after"]
    if after is None:
        print("recommended: nothing fits in memory at any micro-batch; more GPUs, or more checkpointing")
    elif not rec["overrides"]:
        print(f"recommended: keep the configured batch split and hpZ (step {before['step_seconds']:.3f} s, "
              f"{before['bound']}-bound)")
    else:
        sets = " ".join(f"--set {k}={v}" for k, v in rec["overrides"].items())
        print(f"recommended: {sets}  (step {before['step_seconds']:.3f} s {before['bound']}-bound -> "
              f"{after['step_seconds']:.3f} s {after['bound']}-bound)")


if __name__ == "__main__":
    sys.exit(main())
