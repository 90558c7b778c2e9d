"""ZeRO-3 model-state memory per rank against no partitioning, and what activation
checkpointing trades: memory against step time.

    python benchmarks/zero3_memory.py [--model coatnet_2]

1. Model states (parameters, gradients, AdamW moments) after one training step, per process:
   DeepSpeed ZeRO-3 on 2 CPU ranks (gloo) against plain PyTorch + AdamW in one process, the
   same model. Measured as resident memory added by building the model and taking one step,
   glibc told to return freed blocks (MALLOC_MMAP_THRESHOLD_). Ratio goal: about 0.5.
2. coatnet_0 at 224 px, batch 8: activation memory and step time with checkpointing every
   block against none (benchmarks/model_throughput.py's probe). Goal: >= 2.5x less
   activation memory for <= 1.4x step time.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
from model_throughput import memory as checkpointing_memory  # noqa: E402

IMAGE_SIZE, BATCH = 64, 4  # model states do not depend on the input; keep the step cheap


def _one_step(model_or_engine, backward, step) -> None:
    images = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    loss = torch.nn.functional.cross_entropy(model_or_engine(images), torch.randint(0, 1000, (BATCH,)))
    backward(loss)
    step()


def plain_probe(model_name: str) -> dict:
    from coatnet_scale.models import create_model

    before = psutil.Process().memory_info().rss
    model = create_model(model_name, image_size=IMAGE_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _one_step(model, lambda loss: loss.backward(), optimizer.step)
    return {"bytes": psutil.Process().memory_info().rss - before}


def zero3_probe(rank: int, world_size: int, port: int, model_name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu")
    import deepspeed

    from coatnet_scale.models import create_model

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    # Small communication buckets, so the figure is the model states rather than DeepSpeed's
    # fixed-size staging buffers (hundreds of MiB at the defaults, whatever the model).
    zero = {"stage": 3, "reduce_bucket_size": 5_000_000, "stage3_prefetch_bucket_size": 5_000_000,
            "stage3_max_live_parameters": 10_000_000, "stage3_param_persistence_threshold": 10_000}
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
              "train_batch_size": BATCH * world_size, "zero_optimization": zero,
              "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True}
    torch.distributed.barrier()
    before = psutil.Process().memory_info().rss
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = create_model(model_name, image_size=IMAGE_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    _one_step(engine, engine.backward, engine.step)
    used = psutil.Process().memory_info().rss - before
    Path(f"{out}.{rank}").write_text(json.dumps({"bytes": used}))
    torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="coatnet_2")
    parser.add_argument("--probe", choices=["plain"], help=argparse.SUPPRESS)
    parser.add_argument("--skip-checkpointing", action="store_true", help="only the ZeRO-3 comparison")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.probe == "plain":
        print(json.dumps(plain_probe(args.model)))
        return

    from coatnet_scale.models import count_parameters, create_model

    with torch.device("meta"):
        params = count_parameters(create_model(args.model))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    plain = json.loads(subprocess.run([sys.executable, __file__, "--probe", "plain", "--model", args.model],
                                      capture_output=True, text=True, check=True, env=env).stdout.splitlines()[-1])
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"zero3_probe_{os.getpid()}"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import torch.multiprocessing as mp; "
            f"from zero3_memory import zero3_probe; "
            f"mp.spawn(zero3_probe, args=(2, {port}, {args.model!r}, {str(out)!r}), nprocs=2)")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    ranks = [json.loads(Path(f"{out}.{r}").read_text())["bytes"] for r in range(2)]
    for r in range(2):
        Path(f"{out}.{r}").unlink()
    print(f"model states of {args.model} ({params / 1e6:.1f}M parameters, fp32 + AdamW), after one step:")
    print(f"  no partitioning, 1 process:  {plain['bytes'] / 2**20:8.0f} MiB   (4 x params = {16 * params / 2**20:.0f} MiB)")
    for r, used in enumerate(ranks):
        print(f"  ZeRO-3, rank {r} of 2:        {used / 2**20:8.0f} MiB")
    print(f"  ratio per rank / unpartitioned: {max(ranks) / plain['bytes']:.2f}")
    if not args.skip_checkpointing:
        checkpointing_memory(argparse.Namespace(batch=8, image_size=224, skip_compile=True))


if __name__ == "__main__":
    main()
