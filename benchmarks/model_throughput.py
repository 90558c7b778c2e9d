"""Training-step throughput of our coatnet_0 against timm's coatnet_0_224, and the memory that
activation checkpointing saves.

    python benchmarks/model_throughput.py [--batch 8] [--image-size 224] [--rounds 3]

Throughput: images/s of forward + backward + AdamW step at batch 8, 224 px, both models built
in this process and timed in alternating rounds (median of rounds), so machine noise hits
both alike. Prints both and the ratio ours / timm (goal >= 1.0).

Memory: each checkpointing mode runs in a fresh subprocess, with glibc told to return every
large free block to the OS (MALLOC_MMAP_THRESHOLD_), so resident memory follows live tensors.
Peak resident memory over two training steps, minus the memory held before the first step
(model + optimizer) and minus gradients and AdamW's two moments (3 x parameter bytes), is the
activation memory; "every block" is compared with "none" at the same batch.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

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


def memory_probe(every: int, batch: int, image_size: int) -> dict:
    """Run in a subprocess: peak RSS of one training step above the pre-step baseline."""
    from coatnet_scale.models import Checkpointing, create_model

    model = create_model("coatnet_0", image_size=image_size, checkpointing=Checkpointing(every=every)).train()
    step = train_step_fn(model, batch, image_size)
    base = psutil.Process().memory_info().rss
    times = []
    for _ in range(2):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    return {"activation_bytes": peak - base - state_bytes, "step_seconds": times[-1]}


def memory(args) -> None:
    results = {}
    for every in (0, 1):
        out = subprocess.run(
            [sys.executable, __file__, "--probe", str(every), "--batch", str(args.batch), "--image-size", str(args.image_size)],
            capture_output=True, text=True, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        )
        results[every] = json.loads(out.stdout.strip().splitlines()[-1])
    none, every = results[0], results[1]
    print(f"\nactivation checkpointing, coatnet_0, batch {args.batch} at {args.image_size}px:")
    print(f"  none:        activations {none['activation_bytes'] / 2**20:6.0f} MiB, step {none['step_seconds']:.2f}s")
    print(f"  every block: activations {every['activation_bytes'] / 2**20:6.0f} MiB, step {every['step_seconds']:.2f}s")
    print(
        f"  activation memory none/every {none['activation_bytes'] / every['activation_bytes']:.2f}x, "
        f"time ratio every/none {every['step_seconds'] / none['step_seconds']:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    if args.probe is not None:
        print(json.dumps(memory_probe(args.probe, args.batch, args.image_size)))
        return
    throughput(args)
    memory(args)


if __name__ == "__main__":
    main()
