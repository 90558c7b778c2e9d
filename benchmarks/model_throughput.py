"""Training-step throughput of our coatnet_0 against timm's coatnet_0_224, and the memory that
activation checkpointing saves.

    python benchmarks/model_throughput.py [--batch 8] [--image-size 224] [--rounds 3]

Throughput: images/s of forward + backward + AdamW step at batch 8, 224 px, both models built
in this process and timed in alternating rounds (median of rounds), so machine noise hits
both alike. Prints both and the ratio ours / timm (goal >= 1.0).

Memory: no checkpointing, `auto` (the blocks model.checkpointing=auto picks for an activation
budget halfway between the planner's none and full figures) and every block of S1-S4, each in a fresh
subprocess, with glibc told to return every large free block to the OS
(MALLOC_MMAP_THRESHOLD_), so resident memory follows what is allocated. A first training step
sets up what stays for the process's life (oneDNN's and MKL's generated kernels and primitive
caches, the autograd engine's threads: about 95 MiB, which a baseline taken before it would
count as activations) and AdamW's moments; the baseline is the resident memory after it, with
its gradients dropped. The measured step is a forward and backward in which each parameter's
gradient is dropped once accumulated (a model state, as ZeRO-3 moves it into its partition), so
its peak above the baseline is the activation memory: saved tensors, recomputed blocks,
activation gradients, kernels' workspace. Each figure is printed against the capacity
planner's prediction for the same step (`coatnet_scale.plan.activation_profile`, fp32, CPU
kernels). Step time: median of three full training steps after the measurement. Then the
same step with each block's forward compiled (torch.compile, inductor; model.compile=blocks
without ZeRO-3) against eager.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch


def train_step_fn(model, batch, image_size):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, image_size, image_size)
    labels = torch.randint(0, 1000, (batch,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def throughput(args) -> None:
    import timm

    from coatnet_scale.models import count_parameters, create_model

    torch.manual_seed(0)
    models = {
        "coatnet_scale coatnet_0": create_model("coatnet_0", image_size=args.image_size).train(),
        "timm coatnet_0_224": timm.create_model("coatnet_0_224", img_size=args.image_size).train(),
    }
    steps = {name: train_step_fn(m, args.batch, args.image_size) for name, m in models.items()}
    for name, m in models.items():
        print(f"{name}: {count_parameters(m) / 1e6:.2f}M parameters", flush=True)
    for step in steps.values():  # warm-up: allocator, optimizer state, oneDNN primitives
        step()
    rates = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps_per_round):
                step()
            rates[name].append(args.batch * args.steps_per_round / (time.perf_counter() - start))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.2f} img/s" for n, v in rates.items()), flush=True)
    ours, ref = (statistics.median(v) for v in rates.values())
    print(f"\ntraining step, batch {args.batch} at {args.image_size}px, {torch.get_num_threads()} threads:")
    print(f"  ours {ours:.2f} img/s   timm {ref:.2f} img/s   ratio ours/timm {ours / ref:.3f}")


EVERY_BLOCK = (1, 2, 3, 4)  # the paper's stages S1-S4: every block of the model


def policy_of(spec: str):
    """'none', 'full', or the per-block form as comma-separated block indices ('auto' resolved)."""
    from coatnet_scale.models import Checkpointing

    if spec in ("none", "full"):
        return Checkpointing(every=int(spec == "full"), stages=EVERY_BLOCK)
    return Checkpointing(blocks=tuple(int(b) for b in spec.split(",") if b))


def memory_probe(spec: str, batch: int, image_size: int, compiled: bool = False) -> dict:
    """Run in a subprocess: activation memory of one step (peak resident memory above the
    baseline) and the median time of three full training steps."""
    from coatnet_scale.models import create_model

    policy = policy_of(spec)
    model = create_model("coatnet_0", image_size=image_size, checkpointing=policy).train()
    if compiled:  # as model.compile=blocks does, without DeepSpeed's leaf marking (no ZeRO-3 here)
        from coatnet_scale.engine.compiled import BLOCKS

        torch._dynamo.config.recompile_limit = 64
        for block in (m for m in model.modules() if isinstance(m, BLOCKS)):
            block.forward = torch.compile(block.forward)
    step = train_step_fn(model, batch, image_size)
    start = time.perf_counter()
    step()  # kernels, caches, threads and AdamW's moments: here for good, not activations
    first_step = time.perf_counter() - start  # with compilation, when compiled
    for p in model.parameters():
        p.grad = None
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in model.parameters()]
    images = torch.randn(batch, 3, image_size, image_size)
    # Peak RSS restarts from now. Not getrusage's ru_maxrss: a process started by another keeps
    # its parent's peak across exec, so after the throughput section (two models in the parent)
    # both probes read the parent's peak and the ratio printed 1.00x.
    Path("/proc/self/clear_refs").write_text("5")
    base = psutil.Process().memory_info().rss
    torch.nn.functional.cross_entropy(model(images), torch.randint(0, 1000, (batch,))).backward()
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    activation_bytes = peak - base
    for hook in hooks:
        hook.remove()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"activation_bytes": activation_bytes, "step_seconds": statistics.median(times), "first_step_seconds": first_step,
            "checkpointed_blocks": len(policy.chosen(model.spec)), "blocks": sum(s.depth for s in model.spec.stages)}


def probe(spec: str, args, compiled: bool = False) -> dict:
    command = [sys.executable, __file__, "--probe", spec, "--batch", str(args.batch), "--image-size", str(args.image_size)]
    out = subprocess.run(command + (["--compiled"] if compiled else []), capture_output=True, text=True, check=True,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(args) -> None:
    """None, auto and full checkpointing: measured activation memory against the planner's, and
    step time. `auto` gets an activation budget halfway between the planner's none and full
    figures and checkpoints the blocks model.checkpointing=auto would choose for it."""
    from coatnet_scale.models import Checkpointing
    from coatnet_scale.plan import activation_peak, activation_profile
    from coatnet_scale.plan_checkpointing import block_costs, choose_blocks

    def planned(policy: Checkpointing) -> int:
        return activation_peak("coatnet_0", args.image_size, policy, args.batch, element_bytes=4, device="cpu")

    none_planned, full_planned = planned(policy_of("none")), planned(policy_of("full"))
    budget = (none_planned + full_planned) / 2
    blocks, _ = choose_blocks(block_costs("coatnet_0", args.image_size, element_bytes=4), args.batch, planned, budget)
    runs = {"none": "none", f"auto ({budget / 2**20:.0f} MiB budget)": ",".join(map(str, blocks)), "full": "full"}
    results = {label: probe(spec, args) for label, spec in runs.items()}
    profile = activation_profile("coatnet_0", args.image_size, Checkpointing(every=1, stages=EVERY_BLOCK), element_bytes=4,
                                 device="cpu")
    assert profile.total(False, args.batch) == none_planned
    print(f"\nactivation checkpointing, coatnet_0, batch {args.batch} at {args.image_size}px (fp32, CPU):")
    for (label, spec), r in zip(runs.items(), results.values()):
        predicted = planned(policy_of(spec))
        print(f"  {label + ' (' + str(r['checkpointed_blocks']) + ' of ' + str(r['blocks']) + ' blocks)':<40}"
              f"activations {r['activation_bytes'] / 2**20:6.0f} MiB (planner {predicted / 2**20:6.0f} MiB, "
              f"measured/planner {r['activation_bytes'] / predicted:.2f}), step {r['step_seconds']:.2f}s")
    none, auto, full = results.values()
    for label, r in (("auto", auto), ("full", full)):
        print(f"  {label}: activation memory none/{label} {none['activation_bytes'] / r['activation_bytes']:.2f}x, "
              f"time ratio {label}/none {r['step_seconds'] / none['step_seconds']:.2f}x")
    if not args.skip_compile:
        compiled = probe("none", args, compiled=True)
        print(f"  compiled blocks (torch.compile, inductor), no checkpointing: step {compiled['step_seconds']:.2f}s, "
              f"eager/compiled {none['step_seconds'] / compiled['step_seconds']:.2f}x; first step (compiling) "
              f"{compiled['first_step_seconds']:.0f}s; activations {compiled['activation_bytes'] / 2**20:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--skip-throughput", action="store_true", help="only the memory and compile sections")
    parser.add_argument("--skip-compile", action="store_true", help="leave out compiled blocks")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    if args.probe is not None:
        print(json.dumps(memory_probe(args.probe, args.batch, args.image_size, args.compiled)))
        return
    if not args.skip_throughput:
        throughput(args)
    memory(args)


if __name__ == "__main__":
    main()
