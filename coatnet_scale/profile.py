"""`python -m coatnet_scale.profile --config configs/coatnet5.yaml [--set ...] --steps N`: where a
training step's time goes, stage by stage, against what the device could do.

One worker's step at train.micro_batch_size (a world of one, no accumulation), through the
engine the workers run (engine/worker.py's DeepSpeed engine, the config's checkpointing,
compilation and attention kernel) on the config's training data. After one warm-up step, N
steps are timed; each is cut at boundaries marked by hooks, and every moment of it belongs to
one row:

  stem (S0), S1..S4 (CoAtNet-6/7's S3 in two rows: MBConv, Transformer), head (final norm,
  pre-logits, classifier): forward and backward; a checkpointed block's recomputation falls
  in its stage's backward.
  optimizer step: DeepSpeed's step (ZeRO-3: the partitioned AdamW update).
  ZeRO-3 gather/partition: DeepSpeed's parameter fetch and release around every module, its
  gradient reduce and partition, wherever they run; taken out of the stage they run in.
  data wait: the next batch from the loader, onto the device.
  other: the rest (loss, the engine's own work between the marks).

Timing: CUDA events on the current stream on a GPU (device time; the one synchronize comes
after the step), wall time on the CPU. FLOPs are the planner's (plan_checkpointing): forward
per image times the micro-batch; backward twice the forward plus the recomputed forward of
checkpointed blocks. Bytes moved are an estimate: every op reads its inputs and writes its
outputs once (no fusion: compiled blocks move less), counted on the meta device; backward twice
the forward's. The roofline bound of a row: memory-bound where its FLOPs per byte fall below
the device's peak FLOP/s over its bandwidth; "of roofline" is the achieved FLOP/s over
min(peak, intensity x bandwidth). Peaks: a data-sheet table for known GPUs, measured on the CPU
(matrix multiply and copy; printed with how), or --peak-tflops / --bandwidth-gbs.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from coatnet_scale.config import add_config_arguments, config_from_arguments
from coatnet_scale.models import MODEL_SPECS, create_model
from coatnet_scale.plan import with_overrides
from coatnet_scale.plan_checkpointing import block_costs, stem_and_head_flops

# bf16 dense peak (TFLOP/s) and memory bandwidth (GB/s) from the vendors' data sheets; the
# first name contained in the device's wins.
GPU_PEAKS = {"H200": (989.4, 4800.0), "H100 PCIe": (756.0, 2000.0), "H100": (989.4, 3350.0),
             "A100-SXM4-80GB": (312.0, 2039.0), "A100": (312.0, 1555.0)}


# -- what each row costs by the count: FLOPs (the planner's) and bytes (estimated) ---------------


def row_names(model_name: str) -> list[str]:
    """The model's rows, in forward order: stem, each stage, head."""
    names = ["stem (S0)"]
    for stage in MODEL_SPECS[model_name].stages:
        names.append(f"S{stage.paper_stage} {'MBConv' if stage.kind == 'mbconv' else 'Transformer'}")
    return [*names, "head"]


def row_flops(model_name: str, image_size: int, num_classes: int, checkpointed: set[int]) -> dict[str, tuple[int, int]]:
    """(forward, backward) FLOPs per image of each model row."""
    costs = block_costs(model_name, image_size, num_classes)
    stem, head = stem_and_head_flops(model_name, image_size, num_classes)
    names = row_names(model_name)
    out = {names[0]: (stem, 2 * stem), names[-1]: (head, 2 * head)}
    block = 0
    for name, stage in zip(names[1:-1], MODEL_SPECS[model_name].stages):
        blocks = range(block, block + stage.depth)
        forward = sum(costs[b].flops for b in blocks)
        out[name] = (forward, 2 * forward + sum(costs[b].flops for b in blocks if b in checkpointed))
        block += stage.depth
    return out


class _Traffic(TorchDispatchMode):
    """Bytes each op reads and writes (views move nothing), added to the current row."""

    def __init__(self, element_bytes: int):
        super().__init__()
        self.element_bytes, self.row, self.bytes = element_bytes, "other", {}

    def size(self, t: torch.Tensor) -> int:
        return t.numel() * (self.element_bytes if t.is_floating_point() else t.element_size())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            moved = sum(self.size(t) for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
            self.bytes[self.row] = self.bytes.get(self.row, 0) + moved
        return out


@functools.lru_cache(maxsize=16)
def row_bytes(model_name: str, image_size: int, num_classes: int, batch: int, element_bytes: int) -> dict[str, int]:
    """Forward bytes moved by each model row at this batch, counted on the meta device."""
    with torch.device("meta"):
        model = create_model(model_name, num_classes, image_size).train()
    mode = _Traffic(element_bytes)
    for name, (first, last) in zip(row_names(model_name), _row_modules(model)):
        first.register_forward_pre_hook(lambda m, a, name=name: setattr(mode, "row", name))
        last.register_forward_hook(lambda m, a, o: setattr(mode, "row", "other"))
    with mode:
        model(torch.empty(batch, 3, image_size, image_size, device="meta"))
    return mode.bytes


def _row_modules(model) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(first module, last module) each model row runs, in forward order."""
    return [(model.stem, model.stem), *((blocks[0], blocks[-1]) for blocks in model.stages), (model.norm, model.head)]


# -- the timeline of a step: marks, each opening an interval that belongs to one row -------------


class Clock:
    """Marks: CUDA events on the current stream on a GPU, perf_counter on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


@dataclass
class Timeline:
    clock: Clock
    marks: list = field(default_factory=list)  # (mark, (row, phase))
    phase: str = "forward"
    label: tuple[str, str] = ("other", "forward")

    def enter(self, row: str, phase: str | None = None) -> None:
        self.label = (row, phase or self.phase)
        self.marks.append((self.clock.mark(), self.label))

    def totals(self) -> dict[tuple[str, str], float]:
        """Seconds per (row, phase); the last mark closes the step."""
        out: dict[tuple[str, str], float] = {}
        for (start, label), (end, _) in zip(self.marks, self.marks[1:]):
            out[label] = out.get(label, 0.0) + self.clock.seconds(start, end)
        return out


def _zero_wrapped(timeline: Timeline, function):
    """`function` with its time in the ZeRO-3 row, the interrupted row resumed after it."""
    def wrapped(*args, **kwargs):
        resume = timeline.label
        timeline.enter("ZeRO-3 gather/partition")
        try:
            return function(*args, **kwargs)
        finally:
            timeline.enter(*resume)
    return wrapped


def instrument(engine, model_name: str, timeline: Timeline) -> None:
    """Hooks that mark each row's forward and backward, and ZeRO-3's work wrapped."""
    for name, (first, last) in zip(row_names(model_name), _row_modules(engine.module)):
        first.register_forward_pre_hook(functools.partial(_forward_starts, timeline, name))
        last.register_forward_hook(functools.partial(_forward_ends, timeline, name))
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is not None:  # ZeRO-3: DeepSpeed's module hooks call these by attribute
        for method in ("pre_sub_module_forward_function", "post_sub_module_forward_function",
                       "pre_sub_module_backward_function", "post_sub_module_backward_function"):
            setattr(offload, method, _zero_wrapped(timeline, getattr(offload, method)))
        for method in ("reduce_ready_partitions_and_remove_grads", "independent_gradient_partition_epilogue"):
            setattr(engine.optimizer, method, _zero_wrapped(timeline, getattr(engine.optimizer, method)))


def _forward_starts(timeline: Timeline, name: str, module, args) -> None:
    if timeline.phase != "forward":  # a checkpointed block recomputing: its stage's backward
        return
    timeline.enter(name)
    if isinstance(args[0], torch.Tensor) and args[0].requires_grad:  # its gradient ends the row's backward
        args[0].register_hook(lambda grad: timeline.enter("other", "backward"))


def _forward_ends(timeline: Timeline, name: str, module, args, output) -> None:
    if timeline.phase != "forward":
        return
    timeline.enter("other")
    if output.requires_grad:  # its gradient starts the row's backward
        output.register_hook(lambda grad: timeline.enter(name, "backward"))


# -- running it -------------------------------------------------------------------------------


def device_peaks(cuda: bool, peak_tflops: float | None, bandwidth_gbs: float | None) -> tuple[float, float, str]:
    """(peak FLOP/s, bandwidth bytes/s, where they come from) for this process's device."""
    if cuda:
        name = torch.cuda.get_device_name()
        known = next((v for k, v in GPU_PEAKS.items() if k in name), None)
        if known is None and not (peak_tflops and bandwidth_gbs):
            raise SystemExit(f"profile: no peaks known for {name!r}: give --peak-tflops and --bandwidth-gbs")
        flops, bandwidth = peak_tflops or known[0], bandwidth_gbs or known[1]
        how = f"{name}: {flops:g} TFLOP/s bf16 dense, {bandwidth:g} GB/s" + (" (given)" if peak_tflops else " (data sheet)")
        return flops * 1e12, bandwidth * 1e9, how
    measured_flops, measured_bandwidth = measure_cpu()
    flops, bandwidth = (peak_tflops * 1e12 if peak_tflops else measured_flops), (bandwidth_gbs * 1e9 if bandwidth_gbs else measured_bandwidth)
    how = (f"CPU, {torch.get_num_threads()} threads: {flops / 1e12:.3g} TFLOP/s and {bandwidth / 1e9:.3g} GB/s "
           f"({'given' if peak_tflops else 'measured here: the best of 5 fp32 1024x1024 matrix products'}; "
           f"{'given' if bandwidth_gbs else 'the best of 5 copies of 128 MiB'})")
    return flops, bandwidth, how


def measure_cpu() -> tuple[float, float]:
    """What this CPU reaches: FLOP/s of a matrix product, bytes/s of a large copy (read + write)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    source, target = torch.empty(2**25), torch.empty(2**25)  # 128 MiB each
    best_mm = best_copy = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best_mm = min(best_mm, time.perf_counter() - start)
        start = time.perf_counter()
        target.copy_(source)
        best_copy = min(best_copy, time.perf_counter() - start)
    return 2 * 1024**3 / best_mm, 2 * source.numel() * 4 / best_copy


def one_worker(config):
    """The config as one worker's step at its micro-batch: a world of one, no accumulation."""
    t = config.train
    return with_overrides(config, {"cluster.num_workers": 1, "cluster.min_workers": None,
                                   "train.global_batch_size": t.micro_batch_size, "train.grad_accum_steps": 1})


def timed_step(engine, batches, loader, device, timeline: Timeline, loss_kind: str) -> dict:
    """One step, marked; seconds per (row, phase)."""
    from coatnet_scale.engine.worker import input_dtype, soft_target_loss

    timeline.marks.clear()
    timeline.phase = "forward"
    timeline.enter("data wait")
    images, targets = loader.to_device(next(batches), device, input_dtype(engine))
    timeline.enter("other")
    loss = soft_target_loss(engine(images), targets, loss_kind)
    timeline.phase = "backward"
    timeline.enter("other")
    engine.backward(loss)
    timeline.enter("other")
    timeline.phase = "forward"  # what the step does counts as forward time
    timeline.enter("optimizer step")
    engine.step()
    timeline.enter("other")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return timeline.totals()


def run_profile(config, steps: int, peak_tflops: float | None = None, bandwidth_gbs: float | None = None) -> dict:
    """Builds the engine on this process's group (started here if there is none) and times
    `steps` steps after a warm-up one; returns the rows and what they were measured against."""
    import torch.distributed as dist

    from coatnet_scale.data import train_loader
    from coatnet_scale.engine.worker import EpochBatches, build_engine, release_engine
    from coatnet_scale.standalone import init_process_group

    config = one_worker(config)
    use_gpu = config.cluster.use_gpu
    started_group = not dist.is_initialized()
    if started_group:
        init_process_group(use_gpu)
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    peak, bandwidth, peaks_from = device_peaks(use_gpu, peak_tflops, bandwidth_gbs)
    engine, _ = build_engine(config, use_gpu)
    try:
        timeline = Timeline(Clock(use_gpu))
        instrument(engine, config.model.name, timeline)
        loader = train_loader(config, 0, 1)
        batches = EpochBatches(loader, 0)
        measured = [timed_step(engine, batches, loader, device, timeline, config.train.loss) for _ in range(steps + 1)][1:]
        checkpointed = set(engine.module.checkpointing.chosen(MODEL_SPECS[config.model.name]))
        element_bytes = 2 if engine.bfloat16_enabled() else 4
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in engine.module.parameters())
    finally:
        release_engine(engine)
        if started_group:
            dist.destroy_process_group()
    rows = tabulate(config, measured, checkpointed, element_bytes, local, peak, bandwidth)
    return {"model": config.model.name, "image_size": config.model.image_size, "micro_batch": config.train.micro_batch_size,
            "steps": steps, "timing": "CUDA events" if use_gpu else "wall time", "peaks": peaks_from,
            "peak_flops": peak, "bandwidth": bandwidth, "element_bytes": element_bytes, "rows": rows,
            "step_seconds": sum(r["forward_s"] + r["backward_s"] for r in rows)}


def tabulate(config, measured: list[dict], checkpointed: set[int], element_bytes: int, local_params: int,
             peak: float, bandwidth: float) -> list[dict]:
    """One row per stage and cost: median seconds per step, FLOPs, bytes, the roofline."""
    m, batch = config.model, config.train.micro_batch_size
    flops = row_flops(m.name, m.image_size, m.num_classes, checkpointed)
    forward_bytes = row_bytes(m.name, m.image_size, m.num_classes, batch, element_bytes)
    # AdamW on this worker's partition: fp32 master, m and v read and written, the fp32 gradient
    # read, the working copy written.
    optimizer_bytes = local_params * (3 * 8 + 4 + element_bytes)
    names = [*row_names(m.name), "optimizer step", "ZeRO-3 gather/partition", "data wait", "other"]
    rows = []
    for name in names:
        seconds = {phase: _median([t.get((name, phase), 0.0) for t in measured]) for phase in ("forward", "backward")}
        row = {"row": name, "forward_s": seconds["forward"], "backward_s": seconds["backward"]}
        if name in flops:
            f, b = flops[name]
            row.update(flops=(f + b) * batch, forward_flops=f * batch, bytes=3 * forward_bytes.get(name, 0))
        elif name == "optimizer step":
            row["bytes"] = optimizer_bytes
        rows.append(_roofline(row, peak, bandwidth))
    total = sum(r["forward_s"] + r["backward_s"] for r in rows)
    for r in rows:
        r["share"] = (r["forward_s"] + r["backward_s"]) / total if total else 0.0
    return rows


def _median(values) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else 0.0


def _roofline(row: dict, peak: float, bandwidth: float) -> dict:
    seconds = row["forward_s"] + row["backward_s"]
    if row.get("flops"):
        row["tflops"] = row["flops"] / seconds / 1e12 if seconds else 0.0
        intensity = row["flops"] / max(1, row["bytes"])
        row["bound"] = "compute" if intensity >= peak / bandwidth else "memory"
        row["of_roofline"] = row["flops"] / seconds / min(peak, intensity * bandwidth) if seconds else 0.0
    elif row.get("bytes"):
        row["bound"] = "memory"
        row["of_roofline"] = row["bytes"] / seconds / bandwidth if seconds else 0.0
    return row


def format_table(report: dict) -> str:
    lines = [f"{report['model']} at {report['image_size']} px, micro-batch {report['micro_batch']}, "
             f"{8 * report['element_bytes']}-bit, median of {report['steps']} steps ({report['timing']}): "
             f"{report['step_seconds'] * 1e3:.1f} ms per step",
             f"peaks: {report['peaks']}",
             f"| {'row':<24} | {'fwd ms':>8} | {'bwd ms':>8} | {'GFLOP':>9} | {'MB moved':>9} | {'TFLOP/s':>8} | "
             f"{'share':>6} | {'bound':<7} | {'of roofline':>11} |"]
    for r in report["rows"]:
        flops = f"{r['flops'] / 1e9:9.2f}" if "flops" in r else f"{'-':>9}"
        moved = f"{r['bytes'] / 1e6:9.1f}" if r.get("bytes") else f"{'-':>9}"
        tflops = f"{r['tflops']:8.3f}" if "tflops" in r else f"{'-':>8}"
        roof = f"{r['of_roofline']:11.1%}" if "of_roofline" in r else f"{'-':>11}"
        lines.append(f"| {r['row']:<24} | {r['forward_s'] * 1e3:8.2f} | {r['backward_s'] * 1e3:8.2f} | {flops} | {moved} | "
                     f"{tflops} | {r['share']:6.1%} | {r.get('bound', '-'):<7} | {roof} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coatnet_scale.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--steps", type=int, default=5, help="steps timed after one warm-up step (default 5)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak (default: data sheet; measured on a CPU)")
    parser.add_argument("--bandwidth-gbs", type=float, help="the device's memory bandwidth in GB/s (default: as above)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    config = config_from_arguments(args)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if config.cluster.use_gpu else "cpu")  # before DeepSpeed loads
    report = run_profile(config, args.steps, args.peak_tflops, args.bandwidth_gbs)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
