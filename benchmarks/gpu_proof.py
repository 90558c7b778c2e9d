"""Proof of the GPU path, in one prepared run: bf16, ZeRO-3 over NCCL, CoAtNet-5 and -7.

    python benchmarks/gpu_proof.py --out proof.json             # one GPU, about 6 minutes
    python benchmarks/gpu_proof.py --smoke --out smoke.json     # the same code, tiny, on the CPU

On a GPU host that has PyTorch but not DeepSpeed (no Ray needed): `make wheelhouse` here
(launch/wheelhouse.sh: this project, DeepSpeed, pydantic, webdataset and what they import), carry
wheelhouse/, and there run
    python3 -m pip install -q --no-index --no-deps --target /tmp/site wheelhouse/*.whl
    PYTHONPATH=/tmp/site:$PWD DS_BUILD_OPS=0 python3 benchmarks/gpu_proof.py --budget-s 380 --out $OUT/proof.json
(about 5 minutes on an H200; --budget-s starts no part after that many seconds), or the whole
leased run, attention to headline: benchmarks/gpu_run.sh.

What it measures, each part in a process of its own (as a worker is: nothing an earlier part
left on the device counts against the next), each against a figure from the same run:
0. attention (first, seconds): benchmarks/attention_check.py, CoAtNet-5's (20 heads of 64) and
   CoAtNet-6/7's (12 of 128) attention at the six token counts: the gradients of the bias table,
   q, k and v under every SDPA kernel in bf16 against math in fp32, right / WRONG / unavailable
   and milliseconds each. The kernel the engine runs (model.attention_backend=auto) must be
   right everywhere, or the part fails and the proof exits 1; `auto_choice` is the fastest
   kernel right everywhere (what coatnet_scale.models.coatnet.MEASURED_AUTO records).
0b. profile: `python -m coatnet_scale.profile`'s per-stage table of configs/coatnet5.yaml as
   configured (compiled blocks, auto checkpointing) at the engine's micro-batch on this corpus:
   forward and backward time of the stem, each stage and the head, the optimizer step, ZeRO-3's
   gathers and partitions and the data wait, with FLOPs, bytes, TFLOP/s and the roofline bound.
1. engine: CoAtNet-5 at 224 px, bf16, ZeRO-3 on a world of one over NCCL, activation
   checkpointing on stages 2-4 (as configs/coatnet5.yaml), through the worker loop Ray Train
   runs (`engine.worker.train`, launched by coatnet_scale/standalone.py) on a corpus built
   here: images/s, MFU (3x the forward FLOPs against the device's bf16 dense peak), hardware
   FLOP utilisation (the recomputed forwards counted too), and peak allocated memory against
   `python -m coatnet_scale.plan`'s allocation for the same micro-batch (before its reserve).
2. checkpoint: the run saves at step N-1 and goes on to N; a second run resumes from N-1 and
   its loss at step N must equal the first run's bit for bit; then an export of the checkpoint.
3. baselines: the same model in plain PyTorch (bf16 autocast, fused AdamW, the same
   checkpointing) and timm's coatnet_5_224 (its own gradient checkpointing) on synthetic
   tensors: our engine's images/s over each.
4. largest: CoAtNet-7 at 224, AC on every block, at the largest micro-batch the planner says
   fits this GPU: a few steps; peak allocated memory against the planner.
5. profile: the plain model's device time by operator over two steps (what limits MFU).
6. ablation: CoAtNet-5 as in 1, a few steps per row: activation checkpointing full against
   `auto` (the planner's choice for this GPU), then compiled blocks (model.compile=blocks) and
   channels-last convolutions each on top of `auto`: images/s, MFU, peak allocated memory and
   the planner's prediction beside each. --smoke leaves out the compiled row (inductor on the
   CPU takes minutes; tests/test_memory_levers.py covers it).
Prints a table and writes everything as JSON to --out. --smoke runs the same code at tiny
sizes on the CPU (gloo, bf16) with Ray, s3fs and the Prometheus client made unimportable:
the suite runs it.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# bf16 dense tensor-core peaks (TFLOP/s) from the vendors' data sheets, by device name.
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1}


def device_peak(name: str, given: float | None) -> tuple[float, str]:
    if given:
        return given, f"{given:g} TFLOP/s (--peak-tflops)"
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak, f"{peak:g} TFLOP/s ({key} bf16 dense, data sheet)"
    raise SystemExit(f"gpu_proof: no bf16 peak known for {name!r}: give --peak-tflops")


class Sizes:
    """What each part runs: the real sizes on a GPU, tiny ones for --smoke on the CPU."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.model, self.largest_model = ("coatnet_pico", "coatnet_pico_split") if smoke else ("coatnet_5", "coatnet_7")
        self.timm_model = "coatnet_pico_rw_224" if smoke else "coatnet_5_224"
        self.image_size = 64 if smoke else 224
        self.micro_batch = 8 if smoke else 128
        self.steps = 6 if smoke else 26  # checkpoint at steps - 1
        self.log_every = 1 if smoke else 5
        self.baseline_steps = 3 if smoke else 10
        self.largest_steps = 2 if smoke else 3
        self.ablation_steps = 3 if smoke else 8  # logged every log_every; the first window is warm-up
        # Each loader slot (1,438 demo images / workers) must hold a few full micro-batches; the
        # largest part keeps them all in one slot, as its micro-batch may pass 300.
        self.loader_workers = 1 if smoke else 4


def proof_config(sizes: Sizes, model: str, micro_batch: int, storage: str, corpus: str, run_name: str,
                 stages: list[int], steps: int, checkpoint_every: int, loader_workers: int | None = None,
                 extra: tuple[str, ...] = ()):
    from coatnet_scale.config import load_config

    return load_config(None, [
        f"run_name={run_name}", f"model.name={model}", f"model.image_size={sizes.image_size}", "model.num_classes=10",
        "model.checkpointing.every=1", f"model.checkpointing.stages={stages}",
        f"data.train_manifest={corpus}/train/manifest.json", "data.val_manifest=null",
        f"data.num_workers={loader_workers or sizes.loader_workers}", f"train.micro_batch_size={micro_batch}",
        f"train.global_batch_size={micro_batch}", f"train.total_steps={steps}", "train.warmup_steps=2",
        f"train.log_every={sizes.log_every}", "cluster.num_workers=1", f"cluster.use_gpu={not sizes.smoke}",
        f"cluster.cpus_per_worker={2 if sizes.smoke else 16}", "deepspeed.zero_stage=3", "deepspeed.bf16=true",
        f"checkpoint.every_steps={checkpoint_every}", "checkpoint.keep=2", "checkpoint.at_end=false",
        f"storage.url={storage}", "monitoring.enabled=false",
        # CPU workers plan model.checkpointing=auto for a pretend device of this size.
        *(["cluster.gpu_memory=0.5"] if sizes.smoke else []), *extra,
    ])


def planner(config, device_memory: int) -> dict:
    """The planner's figures for this config on one device: allocation before the reserve."""
    from coatnet_scale.plan import plan

    r = plan(config, 1, device_memory, 989.4, 0.45)
    return {"predicted_bytes": r["allocated"], "largest_micro_batch": r["largest_micro_batch"],
            "checkpointing": r["checkpointing"].policy}


def flops(model: str, image_size: int, policy) -> tuple[int, int]:
    """(forward FLOPs per image, of which inside blocks `policy` checkpoints, so recomputes)."""
    from coatnet_scale.models import MODEL_SPECS, count_flops
    from coatnet_scale.plan_checkpointing import block_costs

    costs = block_costs(model, image_size, num_classes=10)
    return count_flops(model, image_size, 10), sum(costs[b].flops for b in policy.chosen(MODEL_SPECS[model]))


def run_engine(config) -> tuple[dict, list[dict]]:
    """The worker loop on this process's group; (final figures, logged windows)."""
    from coatnet_scale.engine.worker import Placement, run_url, train
    from coatnet_scale.storage import url_to_fs

    final = train(config, Placement(0, 1))
    fs, path = url_to_fs(run_url(config))
    history = json.loads(fs.cat_file(sorted(fs.glob(f"{path}/metrics-step*.json"))[-1]))["history"]
    return final, history


def release_memory() -> int:
    """Frees what earlier parts left and restarts the peak; returns the bytes still allocated
    (reported: a leftover would inflate the next part's peak)."""
    import torch

    gc.collect()
    if not torch.cuda.is_available():
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def part_engine(sizes: Sizes, device, work: Path, corpus: str, peak_flops: float | None, memory: int | None) -> dict:
    """CoAtNet-5 through the worker loop; then the resume and the export."""
    from coatnet_scale.engine.checkpoint import tag_for
    from coatnet_scale.export import export
    from coatnet_scale.models import Checkpointing

    stages = [2, 3, 4]
    config = proof_config(sizes, sizes.model, sizes.micro_batch, str(work / "runs"), corpus, "engine", stages,
                          sizes.steps, sizes.steps - 1)
    leftover = release_memory()
    final, history = run_engine(config)
    # Throughput from whole windows after the first (warm-up) and before the checkpoint's.
    windows = [h for h in history if sizes.log_every < h["step"] < sizes.steps - 1 + sizes.log_every
               and h["step"] % sizes.log_every == 0] or history[-1:]
    images_per_second = statistics.median(h["images_per_second"] for h in windows)
    forward, recomputed = flops(sizes.model, sizes.image_size, Checkpointing(1, tuple(stages)))
    result = {
        "model": sizes.model, "micro_batch": sizes.micro_batch, "images_per_second": images_per_second,
        "data_wait_fraction": statistics.median(h["data_wait_fraction"] for h in windows),
        "forward_flops_per_image": forward, "recomputed_flops_per_image": recomputed,
        "checkpoint_save_seconds": next(h["checkpoint_seconds"] for h in history if "checkpoint_seconds" in h),
        "loss_at_last_step": history[-1]["loss"], "allocated_before": leftover,
    }
    if peak_flops:
        result["mfu"] = 3 * forward * images_per_second / peak_flops
        result["hardware_flops_utilisation"] = (3 * forward + recomputed) * images_per_second / peak_flops
    if memory:
        result["peak_allocated_bytes"] = max(h.get("max_memory_allocated", 0) for h in history)
        result.update(planner(config, memory))
        result.pop("checkpointing")
        result["measured_over_predicted"] = result["peak_allocated_bytes"] / result["predicted_bytes"]

    # Resume: drop the last save's successor (there is none: at_end is off) and rerun the same
    # run name; it resumes from step N-1 and takes step N again.
    release_memory()
    _, resumed = run_engine(config)
    result["resumed_loss_at_last_step"] = resumed[-1]["loss"]
    result["resume_bit_identical"] = resumed[-1]["loss"] == history[-1]["loss"] and resumed[-1]["step"] == sizes.steps
    # Two engines were built and released in this process: ZeRO-3's global module stack must hold
    # neither (it kept every model, and grew every step, before engine.worker.release_engine).
    from deepspeed.runtime.zero.parameter_offload import FWD_MODULE_STACK

    result["modules_left_on_zero3_stack"] = len(FWD_MODULE_STACK)
    start = time.monotonic()
    checkpoint = f"{config.storage.url}/{config.run_name}/checkpoints/{tag_for(sizes.steps - 1)}"
    out = work / "engine.safetensors"
    export(checkpoint, str(out))
    result["export_seconds"] = time.monotonic() - start
    result["export_bytes"] = out.stat().st_size
    return result


def plain_step(model, micro_batch: int, image_size: int, device):
    """A training step of `model` as plain PyTorch runs it: bf16 autocast, fused AdamW."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images = torch.randn(micro_batch, 3, image_size, image_size, device=device)
    labels = torch.randint(0, 10, (micro_batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step, steps: int, device) -> float:
    """Images/s is micro-batch over this: seconds per step after two warm-up steps."""
    import torch

    for _ in range(2):
        step()
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return (time.perf_counter() - start) / steps


def part_baselines(sizes: Sizes, device) -> dict:
    import torch

    from coatnet_scale.models import Checkpointing, count_parameters, create_model

    result = {}
    release_memory()
    torch.manual_seed(0)
    model = create_model(sizes.model, num_classes=10, image_size=sizes.image_size,
                         checkpointing=Checkpointing(1, (2, 3, 4))).to(device).train()
    step = plain_step(model, sizes.micro_batch, sizes.image_size, device)
    result["plain_images_per_second"] = sizes.micro_batch / timed(step, sizes.baseline_steps, device)
    result["profile"] = profile(step, device)
    del model, step
    release_memory()
    try:
        import timm
    except ImportError:
        result["timm"] = "timm not installed"
        return result
    model = timm.create_model(sizes.timm_model, num_classes=10, img_size=sizes.image_size).to(device).train()
    model.set_grad_checkpointing(True)
    step = plain_step(model, sizes.micro_batch, sizes.image_size, device)
    result["timm_model"] = f"{sizes.timm_model} ({count_parameters(model) / 1e6:.1f}M parameters)"
    result["timm_images_per_second"] = sizes.micro_batch / timed(step, sizes.baseline_steps, device)
    del model, step
    release_memory()
    return result


def profile(step, device) -> list[dict]:
    """Share of device (or CPU) time per operator over two steps, largest first."""
    import torch
    from torch.profiler import ProfilerActivity

    # With the CPU activity too, rows are operators (aten::…) with their device time, not kernels.
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        own = getattr(event, "self_device_time_total", None) if device.type == "cuda" else event.self_cpu_time_total
        if own is None:
            own = getattr(event, "self_cuda_time_total", 0)
        if own > 0:
            rows.append((event.key, own))
    total = sum(t for _, t in rows) or 1
    rows.sort(key=lambda r: -r[1])
    return [{"operator": k, "share": t / total} for k, t in rows[:10]]


def part_largest(sizes: Sizes, work: Path, corpus: str, memory: int | None) -> dict:
    """CoAtNet-7 at the planner's largest micro-batch, AC on every block: a few steps."""
    import torch

    probe = proof_config(sizes, sizes.largest_model, 1, str(work / "runs"), corpus, "largest", [1, 2, 3, 4], 1, 10**9)
    budget = memory or 2**29  # on the CPU a pretend 512 MiB device: the path runs, memory is not measured
    plan = planner(probe, budget)
    micro = max(1, plan["largest_micro_batch"])
    config = proof_config(sizes, sizes.largest_model, micro, str(work / "runs"), corpus, "largest", [1, 2, 3, 4],
                          sizes.largest_steps, 10**9, loader_workers=1)
    result = {"model": sizes.largest_model, "micro_batch": micro, **planner(config, budget)}
    result.pop("checkpointing")
    result["allocated_before"] = release_memory()
    try:
        final, history = run_engine(config)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # the planner said it fits: a finding, not a crash
        if "out of memory" not in str(e).lower():
            raise
        result["out_of_memory"] = str(e).splitlines()[0]
        return result
    result["images_per_second"] = history[-1]["images_per_second"]  # the last step's window: past warm-up
    if memory:
        result["peak_allocated_bytes"] = max(h.get("max_memory_allocated", 0) for h in history)
        result["measured_over_predicted"] = result["peak_allocated_bytes"] / result["predicted_bytes"]
    return result


# Each lever against the `auto` row (the configs' setting): a few steps of the engine's model each.
ABLATION = (
    ("checkpointing full", ("model.checkpointing.every=1", "model.checkpointing.stages=[1,2,3,4]")),
    ("checkpointing auto", ("model.checkpointing=auto",)),
    ("auto + channels-last", ("model.checkpointing=auto", "model.channels_last=true")),
    ("auto + compiled blocks", ("model.checkpointing=auto", "model.compile=blocks")),  # last: compiles for minutes
)


def part_ablation(sizes: Sizes, index: int, work: Path, corpus: str, peak_flops: float | None,
                  memory: int | None) -> dict:
    """Row `index` of ABLATION: images/s, MFU and peak memory of a few steps through the worker
    loop, the planner's prediction beside."""
    name, extra = ABLATION[index]
    if sizes.smoke and "model.compile=blocks" in extra:  # inductor on 2 CPU cores takes minutes
        return {"row": name, "skipped": "--smoke (tests/test_memory_levers.py trains compiled blocks on the CPU)"}
    return ablation_row(sizes, work, corpus, peak_flops, memory, {"row": name}, extra, index)


def ablation_row(sizes: Sizes, work: Path, corpus: str, peak_flops: float | None, memory: int | None, row: dict,
                 extra: tuple[str, ...], index: int) -> dict:
    from coatnet_scale.models import MODEL_SPECS

    config = proof_config(sizes, sizes.model, sizes.micro_batch, str(work / "runs"), corpus, f"ablation-{index}",
                          [1, 2, 3, 4], sizes.ablation_steps, 10**9, extra=extra)
    predicted = planner(config, memory or round(config.cluster.gpu_memory * 2**30))
    policy = predicted.pop("checkpointing")
    row["checkpointed_blocks"] = f"{len(policy.chosen(MODEL_SPECS[sizes.model]))} of " \
                                 f"{sum(s.depth for s in MODEL_SPECS[sizes.model].stages)}"
    row.update(predicted)
    row["allocated_before"] = release_memory()
    _, history = run_engine(config)
    windows = history[1:] or history  # after the first window (warm-up, compilation)
    row["images_per_second"] = statistics.median(h["images_per_second"] for h in windows)
    forward, recomputed = flops(sizes.model, sizes.image_size, policy)
    if peak_flops:
        row["mfu"] = 3 * forward * row["images_per_second"] / peak_flops
        row["hardware_flops_utilisation"] = (3 * forward + recomputed) * row["images_per_second"] / peak_flops
    if memory:
        row["peak_allocated_bytes"] = max(h.get("max_memory_allocated", 0) for h in history)
        row["measured_over_predicted"] = row["peak_allocated_bytes"] / row["predicted_bytes"]
    return row


def ablation_table(rows: list[dict]) -> str:
    GiB = 2**30
    lines = [f"| {'ablation row':<24} | blocks ckpt | images/s | MFU    | peak / planner GiB |"]
    for r in rows:
        if "skipped" in r or "failed" in r:
            lines.append(f"| {r['row']:<24} | " + (f"skipped: {r['skipped']}" if "skipped" in r else f"FAILED: {r['failed'][:300]}") + " |")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        memory = (f"{r['peak_allocated_bytes'] / GiB:.2f} / {r['predicted_bytes'] / GiB:.2f}" if "peak_allocated_bytes" in r
                  else f"n/a / {r['predicted_bytes'] / GiB:.2f}")
        lines.append(f"| {r['row']:<24} | {r['checkpointed_blocks']:>11} | {r['images_per_second']:8.1f} | {mfu:>6} | {memory} |")
    return "\n".join(lines)


def table(report: dict) -> str:
    GiB = 2**30
    rows = [("device", report.get("device", "n/a (no part ran)")), ("peak assumed", report.get("peak", "n/a (CPU)"))]
    e, b, big = (report.get(part, {}) for part in ("engine", "baselines", "largest"))
    for check in report.get("attention", {}).get("checks", []):
        wrong = f"; WRONG: {', '.join(check['wrong'])}" if check["wrong"] else ""
        rows.append((f"attention {check['heads']}x{check['head_dim']}, 6 token counts",
                     f"engine runs {', '.join(check['engine_kernels'])}: {'right' if check['engine_right'] else 'WRONG'}; "
                     f"fastest right: {check['auto_choice']}{wrong}"))
    for part, figures in (("attention", report.get("attention", {})), ("engine", e), ("baselines", b), ("largest", big)):
        if "failed" in figures or "skipped" in figures:
            rows.append((part, f"FAILED: {figures['failed']}" if "failed" in figures else f"skipped: {figures['skipped']}"))
    if "images_per_second" in e:
        rows.append((f"engine {e['model']} mb {e['micro_batch']} images/s", f"{e['images_per_second']:.1f} "
                                                                         f"(data wait {e['data_wait_fraction']:.0%})"))
    if "mfu" in e:
        rows += [("MFU (3x forward)", f"{e['mfu']:.1%}"),
                 ("hardware FLOP utilisation (with recompute)", f"{e['hardware_flops_utilisation']:.1%}")]
    if "peak_allocated_bytes" in e:
        rows.append(("peak allocated vs planner", f"{e['peak_allocated_bytes'] / GiB:.2f} / {e['predicted_bytes'] / GiB:.2f} "
                                                  f"GiB = {e['measured_over_predicted']:.3f} (held before: "
                                                  f"{e['allocated_before'] / GiB:.2f} GiB)"))
    engine_speed = e.get("images_per_second", float("nan"))
    if "plain_images_per_second" in b:
        rows.append(("plain PyTorch images/s", f"{b['plain_images_per_second']:.1f} (engine / plain "
                                               f"{engine_speed / b['plain_images_per_second']:.3f})"))
    if "timm_images_per_second" in b:
        rows.append((f"timm {b['timm_model']} images/s", f"{b['timm_images_per_second']:.1f} (engine / timm "
                                                         f"{engine_speed / b['timm_images_per_second']:.3f})"))
    if "resume_bit_identical" in e:
        rows += [("checkpoint save", f"{e['checkpoint_save_seconds']:.1f} s"),
                 ("resume: next loss bit-identical", f"{e['resume_bit_identical']} ({e['loss_at_last_step']!r} vs "
                                                     f"{e['resumed_loss_at_last_step']!r})"),
                 ("export", f"{e['export_bytes'] / GiB:.2f} GiB in {e['export_seconds']:.1f} s")]
    if "micro_batch" in big:
        largest = f"{big['model']} mb {big['micro_batch']} (planner's largest)"
        if "out_of_memory" in big:
            rows.append((largest, f"OUT OF MEMORY: {big['out_of_memory']}"))
        elif "peak_allocated_bytes" in big:
            rows.append((largest, f"{big['images_per_second']:.1f} images/s; peak {big['peak_allocated_bytes'] / GiB:.2f} / "
                                  f"planner {big['predicted_bytes'] / GiB:.2f} GiB = {big['measured_over_predicted']:.3f} "
                                  f"(held before: {big['allocated_before'] / GiB:.2f} GiB)"))
        elif "images_per_second" in big:
            rows.append((largest, f"{big['images_per_second']:.1f} images/s"))
    rows += [(f"  profile: {p['operator'][:48]}", f"{p['share']:.1%}") for p in b.get("profile", [])[:6]]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{width}} | {v} |" for k, v in rows)


PARTS = ("attention", "profile", "engine", "baselines", "largest", *(f"ablation:{i}" for i in range(len(ABLATION))))


def part_profile(sizes: Sizes, work: Path, corpus: str, peak_tflops: float | None) -> dict:
    """coatnet_scale.profile on this process's group: coatnet5.yaml as configured (smoke: the tiny
    model, as the engine part runs it)."""
    from coatnet_scale.config import load_config
    from coatnet_scale.profile import format_table, run_profile

    if sizes.smoke:
        config = proof_config(sizes, sizes.model, sizes.micro_batch, str(work / "runs"), corpus, "profile", [2, 3, 4],
                              10**6, 10**9)
    else:
        config = load_config("coatnet5.yaml", [
            "run_name=profile", "model.num_classes=10", f"train.micro_batch_size={sizes.micro_batch}",
            f"data.train_manifest={corpus}/train/manifest.json", "data.val_manifest=null", "monitoring.enabled=false",
            f"data.num_workers={sizes.loader_workers}", f"storage.url={work / 'runs'}", "cluster.num_workers=1",
            f"train.global_batch_size={sizes.micro_batch}", "checkpoint.at_end=false"])
    report = run_profile(config, 2 if sizes.smoke else 5, peak_tflops)
    print(format_table(report), flush=True)
    return report


def part_attention(sizes: Sizes, device) -> dict:
    """benchmarks/attention_check.py at the model's head shapes; failed when the engine's kernel is wrong."""
    import attention_check

    shapes = [(2, 16)] if sizes.smoke else [(20, 64), (12, 128)]  # CoAtNet-5 stage 3; CoAtNet-6/7
    reports = [attention_check.run(device, batch=2 if sizes.smoke else 8, heads=h, head_dim=d, repeats=1 if sizes.smoke else 5)
               for h, d in shapes]
    for report in reports:
        print(attention_check.table(report), flush=True)
    figures = {"checks": reports, "auto_choice": [r["auto_choice"] for r in reports],
               "wrong": sorted({k for r in reports for k in r["wrong"]})}
    if not all(r["engine_right"] for r in reports):
        figures["failed"] = (f"the engine's attention kernel ({', '.join(reports[0]['engine_kernels'])}) gives wrong "
                             f"gradients: see checks")
    return figures


def run_part(args, sizes: Sizes) -> dict:
    """One part, in this (child) process: its own process group and its own device memory, as a
    worker has; what an earlier part left cannot inflate this one's peak or run it out of memory."""
    if not args.smoke:
        from coatnet_scale.engine.watchdog import gpu_worker_env

        for key, value in gpu_worker_env(str(args.work)).items():  # the allocator, before CUDA starts
            os.environ.setdefault(key, value)
    import torch

    from coatnet_scale.standalone import init_process_group

    init_process_group(use_gpu=not args.smoke)
    device = torch.device("cuda", torch.cuda.current_device()) if not args.smoke else torch.device("cpu")
    found: dict = {"torch": torch.__version__, "device": "CPU (smoke)"}
    memory, peak_flops = None, None
    if not args.smoke:
        properties = torch.cuda.get_device_properties(device)
        found["device"] = f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB"
        peak, found["peak"] = device_peak(properties.name, args.peak_tflops)
        memory, peak_flops = properties.total_memory, peak * 1e12
    work, corpus = Path(args.work), str(Path(args.work) / "corpus")
    part = args.part
    if part == "attention":
        figures = part_attention(sizes, device)
    elif part == "profile":
        figures = part_profile(sizes, work, corpus, args.peak_tflops or (peak_flops / 1e12 if peak_flops else None))
    elif part == "engine":
        figures = part_engine(sizes, device, work, corpus, peak_flops, memory)
    elif part == "baselines":
        figures = part_baselines(sizes, device)
    elif part == "largest":
        figures = part_largest(sizes, work, corpus, memory)
    else:
        figures = part_ablation(sizes, int(part.split(":")[1]), work, corpus, peak_flops, memory)
    torch.distributed.destroy_process_group()
    return {"found": found, "figures": figures}


def run_parts(args, sizes: Sizes, work: Path, report: dict) -> None:
    """Each part in a child process, in order; a failed part is a finding, and the parts after
    it still run. With --budget-s no part starts after the budget, and none outlives it by much."""
    started = time.monotonic()
    report["ablation"] = []
    for part in PARTS:
        elapsed = time.monotonic() - started
        if part in args.skip.split(","):
            figures = {"skipped": "--skip"}
        elif args.budget_s and elapsed > args.budget_s:
            figures = {"skipped": f"--budget-s {args.budget_s:g} spent"}
        else:
            out = work / f"{part.replace(':', '-')}.json"
            command = [sys.executable, __file__, "--part", part, "--work", str(work), "--out", str(out)]
            command += ["--smoke"] if args.smoke else []
            command += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
            start = time.monotonic()
            try:
                code = subprocess.run(command, timeout=args.budget_s + 60 - elapsed if args.budget_s else None).returncode
            except subprocess.TimeoutExpired:
                code = "killed: --budget-s spent"
            if out.exists():
                result = json.loads(out.read_text())
                figures = result.get("figures", result)
                report.update(result.get("found", {}))
            else:
                figures = {"failed": f"the part's process ended with {code} and wrote nothing"}
            if args.smoke and "failed" in figures:
                raise SystemExit(f"gpu_proof: {part} failed: {figures['failed']}")
            print(f"gpu_proof: {part} {'FAILED' if 'failed' in figures else 'done'} in "
                  f"{time.monotonic() - start:.0f}s", flush=True)
        if part.startswith("ablation:"):
            report["ablation"].append({"row": ABLATION[int(part.split(":")[1])][0], **figures})
        else:
            report[part] = figures
        Path(args.out).write_text(json.dumps(report, indent=1))  # what is done survives a later failure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file for the figures")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the test suite runs this)")
    parser.add_argument("--peak-tflops", type=float, help="the device's bf16 dense peak, if its name is not known")
    parser.add_argument("--work", help="folder for the corpus, checkpoints and export (default: a temporary one)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no part after this many seconds, so a leased GPU's time limit still sees a table")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to leave out, of: {', '.join(PARTS)}")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # a child process: one part
    args = parser.parse_args(argv)
    sizes = Sizes(args.smoke)
    if args.smoke:  # the path GPU hosts take: it must not need Ray or s3fs
        for name in ("ray", "s3fs", "prometheus_client"):
            sys.modules[name] = None
    os.environ["DS_ACCELERATOR"] = "cpu" if args.smoke else "cuda"
    if args.part:
        try:
            result = run_part(args, sizes)
        except Exception as e:
            result = {"figures": {"failed": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-6000:]}}
            print(f"gpu_proof: {args.part} FAILED:\n{result['figures']['traceback']}", flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        return 1 if "failed" in result["figures"] else 0

    import torch

    # First: a missing dependency of DeepSpeed is the likeliest failure on a bare GPU host.
    if importlib.util.find_spec("deepspeed") is None:
        raise SystemExit("gpu_proof: cannot import deepspeed; install the wheels named in this script's docstring")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_proof: no GPU; use --smoke on a CPU machine")
    from dataprep.demo import build_demo_corpus

    started = time.monotonic()
    report: dict = {"smoke": args.smoke}
    with tempfile.TemporaryDirectory(prefix="gpu_proof_", dir=args.work) as folder:
        work = Path(folder)
        build_demo_corpus(str(work / "corpus"), workers=sizes.loader_workers)
        run_parts(args, sizes, work, report)
    report["seconds"] = time.monotonic() - started
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(report))
    if "rows" in report.get("profile", {}):
        from coatnet_scale.profile import format_table

        print(format_table(report["profile"]))
    print(ablation_table(report["ablation"]))
    print(f"gpu_proof: {report['seconds']:.0f}s in all; figures in {args.out}")
    if "failed" in report["attention"]:
        print(f"gpu_proof: ATTENTION IS WRONG: {report['attention']['failed']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
