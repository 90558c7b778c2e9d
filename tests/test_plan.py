"""The capacity planner: model-state memory against DeepSpeed's own estimator, activations
from the model's shapes against a measured training step, and the fit verdict."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from torch.profiler import ProfilerActivity, profile

from coatnet_scale.config import load_config
from coatnet_scale.models import Checkpointing, count_parameters, create_model
from coatnet_scale.plan import GiB, activation_profile, hpz_copy_bytes, plan, predicted_allocated_bytes
from coatnet_scale.plan import network


@pytest.mark.parametrize("gpus", [8, 256])
def test_model_states_match_deepspeed_estimator(gpus):
    config = load_config("configs/coatnet7.yaml")
    ours = plan(config, gpus, 80 * GiB, 989.0, 0.45)
    nodes = gpus // 8
    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(
        ours["params"], ours["largest_layer"], num_gpus_per_node=8, num_nodes=nodes, cpu_offload=False,
        cpu_offload_params=False,
    )
    # The estimator leaves out the reduce bucket, which DeepSpeed allocates whole.
    assert ours["states"]["reduce bucket"] == 2 * config.deepspeed.reduce_bucket_size
    assert ours["state_total"] - ours["states"]["reduce bucket"] == pytest.approx(gpu_bytes, rel=0.01)


def test_checkpointing_shrinks_activations_of_transformer_heavy_models():
    every = activation_profile("coatnet_5", 224, Checkpointing(every=1))
    assert every.total(checkpointing=True) < every.total(checkpointing=False) / 3
    # Activations grow with the image: ~ (384/224)^2 more tokens.
    big = activation_profile("coatnet_5", 384, Checkpointing(every=1))
    assert 2.5 < big.total(False) / every.total(False) < 3.5


def test_fit_verdict_and_exit_code():
    fits = subprocess.run([sys.executable, "-m", "coatnet_scale.plan", "--config", "configs/coatnet5.yaml",
                           "--gpus", "128", "--gpu-memory", "80GiB"], capture_output=True, text=True)
    assert fits.returncode == 0 and "fits in" in fits.stdout and "largest micro-batch" in fits.stdout
    # The network section: CoAtNet-5 on 16 nodes, no hpZ, one micro-step of 32; the step is
    # bound by compute at these bandwidths (README, Planning a run).
    assert "network per GPU per step (16 nodes of 8 GPUs, no hpZ, 1 micro-step(s) of 32, 16-bit" in fits.stdout
    assert re.search(r"gradients, reduce-scatter +128 +1 +1\.46GB", fits.stdout), fits.stdout
    assert re.search(r"step [\d.]+ s = compute [\d.]+ s and communication [\d.]+ s overlapped .*; compute-bound", fits.stdout)
    too_small = subprocess.run([sys.executable, "-m", "coatnet_scale.plan", "--config", "configs/coatnet7.yaml",
                                "--gpus", "1", "--gpu-memory", "16GiB"], capture_output=True, text=True)
    assert too_small.returncode == 1 and "DOES NOT FIT" in too_small.stdout


def allocator_peak(prof, trace: Path) -> int:
    """Peak bytes the CPU allocator held while `prof` recorded (torch.profiler's allocation
    events, oneDNN's internal buffers included), above what it held before. Blocks are followed
    by address: the profiler misses some frees made on other threads (DeepSpeed's), and a
    block handed out again was freed."""
    prof.export_chrome_trace(str(trace))
    events = sorted((e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"),
                    key=lambda e: e["ts"])
    live: dict[int, int] = {}
    now = peak = 0
    for event in events:
        address, size = event["args"]["Addr"], event["args"]["Bytes"]
        now -= live.pop(address, 0)
        if size > 0:
            live[address] = size
            now += size
        peak = max(peak, now)
    return peak


def measured_activation_peak(model, batch: int, trace: Path) -> int:
    """Allocator peak of a forward and backward, each parameter's gradient dropped once
    accumulated: a model state, not an activation."""
    images = torch.randn(batch, 3, model.image_size, model.image_size)
    targets = torch.softmax(torch.randn(batch, model.num_classes), dim=1)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in model.parameters()]
    F.cross_entropy(model(images), targets).backward()  # first use: kernels and caches
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        F.cross_entropy(model(images), targets).backward()
    for hook in hooks:
        hook.remove()
    return allocator_peak(prof, trace)


@pytest.mark.parametrize("every", [0, 1])
def test_activation_peak_matches_a_measured_step(every, tmp_path):
    # With checkpointing, the block-sum model the planner had before (saved tensors plus block
    # inputs: no activation gradients, no kernel workspace) was 16% under the measured peak.
    batch, policy = 8, Checkpointing(every=1)
    profile_ = activation_profile("coatnet_pico", 96, policy, element_bytes=4, device="cpu")
    predicted = profile_.total(bool(every), batch)
    torch.manual_seed(0)
    model = create_model("coatnet_pico", image_size=96, checkpointing=Checkpointing(every=every)).train()
    assert predicted == pytest.approx(measured_activation_peak(model, batch, tmp_path / "trace.json"), rel=0.10)


def zero3_allocated_on_rank(rank: int, port: int, trace: str, out: str) -> None:
    """Two training steps of a ZeRO-3 engine of our DeepSpeed config (one CPU rank, fp32), the
    allocator recorded from before the model is built."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      DS_ACCELERATOR="cpu")
    import deepspeed

    from coatnet_scale.engine.zero import deepspeed_config

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    config = load_config("configs/tiny.yaml", ZERO3_RUN)
    ds = deepspeed_config(config, use_gpu=False)
    m, t = config.model, config.train
    images = torch.randn(t.micro_batch_size, 3, m.image_size, m.image_size)
    targets = torch.softmax(torch.randn(t.micro_batch_size, m.num_classes), dim=1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = create_model(m.name, m.num_classes, m.image_size,
                                 checkpointing=Checkpointing(m.checkpointing.every, tuple(m.checkpointing.stages)))
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds)
        for _ in range(2):
            engine.backward(F.cross_entropy(engine(images), targets))
            engine.step()
    Path(out).write_text(str(allocator_peak(prof, Path(trace))))
    torch.distributed.destroy_process_group()


ZERO3_RUN = ["model.image_size=96", "model.num_classes=1000", "model.checkpointing.every=1",
             "model.checkpointing.stages=[1,2,3,4]", "train.micro_batch_size=8", "train.global_batch_size=8",
             "cluster.num_workers=1"]


def test_predicted_allocated_bytes_match_a_zero3_step(unused_tcp_port, tmp_path):
    """The figure the GPU proof compares with torch.cuda.max_memory_allocated, checked against
    the CPU allocator's peak in a real ZeRO-3 run: partitions, DeepSpeed's reduce bucket,
    activations."""
    out = tmp_path / "peak"
    mp.spawn(zero3_allocated_on_rank, args=(unused_tcp_port, str(tmp_path / "trace.json"), str(out)), nprocs=1)
    config = load_config("configs/tiny.yaml", ZERO3_RUN)
    m = config.model
    predicted = predicted_allocated_bytes(m.name, m.image_size, config.train.micro_batch_size, Checkpointing(every=1),
                                          dtype_bytes=4, num_classes=m.num_classes,
                                          reduce_bucket_size=config.deepspeed.reduce_bucket_size, device="cpu")
    assert predicted == pytest.approx(int(out.read_text()), rel=0.10)


def test_predicted_allocated_bytes_adds_states_and_activations():
    policy = Checkpointing(every=1)
    one, two = (predicted_allocated_bytes("coatnet_0", 224, micro, policy) for micro in (8, 16))
    per_image = activation_profile("coatnet_0", 224, policy).per_image(True)
    assert two - one == pytest.approx(8 * per_image, rel=0.01)
    # 18 bytes per parameter on one GPU, plus activations; half the states on two GPUs.
    assert one > 18 * 24.8e6 + 8 * per_image
    halved = predicted_allocated_bytes("coatnet_0", 224, 8, policy, world_size=2)
    assert one - halved == pytest.approx(18 * 24.8e6 / 2, rel=0.01)


# -- network ----------------------------------------------------------------------------------


def comms_on_rank(rank: int, world_size: int, port: int, overrides: list, out: str) -> None:
    """A ZeRO-3 engine of our DeepSpeed config on CPU (gloo), DeepSpeed's comms_logger on: the
    logical message bytes of each collective kind over one optimizer step, after one step that
    records DeepSpeed's parameter trace."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.comm import comm

    from coatnet_scale.engine.zero import deepspeed_config
    from coatnet_scale.models import create_model

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    config = load_config("configs/tiny.yaml", overrides)
    ds = {**deepspeed_config(config, use_gpu=False), "comms_logger": {"enabled": True, "prof_all": True}}
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = create_model(config.model.name, config.model.num_classes, config.model.image_size)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds)
    t = config.train
    for step in range(2):
        comm.comms_logger.reset_data()
        for _ in range(t.grad_accum_steps):
            images = torch.randn(t.micro_batch_size, 3, config.model.image_size, config.model.image_size)
            loss = torch.nn.functional.cross_entropy(engine(images), torch.randint(0, 10, (t.micro_batch_size,)))
            engine.backward(loss)
            # hpZ's secondary copy, made by the forward's gathers, dropped by the optimizer step.
            secondary = [p.ds_secondary_tensor for p in engine.module.parameters() if p.ds_secondary_tensor is not None]
            secondary_bytes = sum(t.numel() * t.element_size() for t in secondary)
            engine.step()
    logged = {op: sum(size * record[0] for size, record in sizes.items()) for op, sizes in comm.comms_logger.get_raw_data().items()}
    logged["hpz_secondary_bytes"] = secondary_bytes
    if rank == 0:
        Path(out).write_text(json.dumps(logged))
    torch.distributed.barrier()


@pytest.mark.slow
def test_network_bytes_match_deepspeeds_comms_logger(unused_tcp_port, tmp_path):
    """4 CPU ranks in hpZ groups of 2, 2 micro-steps per step, small prefetch and reuse windows
    and persistence threshold, so every kind of collective the planner counts occurs: its bytes
    per step agree with DeepSpeed's logger within 10% (logical message bytes: the logger counts
    an all-gather by each rank's input, a reduce-scatter by the whole tensor)."""
    overrides = ["cluster.num_workers=4", "train.micro_batch_size=2", "train.grad_accum_steps=2",
                 "train.global_batch_size=16", "deepspeed.zero_hpz_partition_size=2",
                 "deepspeed.stage3_max_reuse_distance=200000", "deepspeed.stage3_prefetch_bucket_size=10000",
                 "deepspeed.stage3_param_persistence_threshold=1000"]
    out = tmp_path / "logged.json"
    mp.spawn(comms_on_rank, args=(4, unused_tcp_port, overrides, str(out)), nprocs=4)
    logged = json.loads(out.read_text())

    config = load_config("configs/tiny.yaml", overrides)
    n = network(config, gpus=4, gpus_per_node=2, intra_gbps=100, inter_gbps=10, compute_seconds=1.0)
    rows = [r["collective"] for r in n["rows"]]
    gathered = sum(c.count * c.bytes / c.group for c in rows if "reduce-scatter" not in c.what)
    reduced = sum(c.count * c.bytes for c in rows if "reduce-scatter" in c.what)
    assert n["profile"].again > 0 and {c.group for c in rows} == {2, 4}  # re-gathers, hpZ and world groups
    assert logged["all_gather_into_tensor"] == pytest.approx(gathered, rel=0.10)
    assert logged["reduce_scatter_tensor"] == pytest.approx(reduced, rel=0.10)
    # The memory the secondary copy holds per rank after a backward, as the memory planner counts it.
    with torch.device("meta"):
        params = count_parameters(create_model(config.model.name, config.model.num_classes, config.model.image_size))
    assert logged["hpz_secondary_bytes"] == pytest.approx(hpz_copy_bytes(params, 2, dtype_bytes=4), rel=0.05)


@pytest.mark.slow
def test_plan_recommends_a_compute_bound_step(capsys):
    """CoAtNet-6 on 64 H100s as shipped (micro-batch 16, 4 micro-steps) is communication-bound;
    the planner's `recommended:` overrides, applied, are what the same planner calls
    compute-bound, and faster. MFU and hardware FLOP utilisation are printed side by side: the
    shipped `auto` checkpoints no block at micro-batch 16 on 80 GiB, so they are equal; with every
    block recomputed, the hardware does the blocks' forward once more (all but the stem and head)."""
    from coatnet_scale.plan import main

    args = ["--config", "coatnet6", "--gpus", "64", "--gpu-memory", "80GiB"]
    assert main([*args, "--set", "model.checkpointing={every: 1}"]) == 0
    assert "at 34% MFU (hardware FLOP utilisation 45%)" in capsys.readouterr().out
    assert main(args) == 0
    before = capsys.readouterr().out
    assert "communication-bound" in before.splitlines()[-2]
    assert "activation checkpointing: auto, 0 of 58 blocks" in before
    assert "at 34% MFU (hardware FLOP utilisation 34%)" in before
    line = before.splitlines()[-1]
    assert line.startswith("recommended: --set "), line
    overrides = re.findall(r"--set (\S+)", line)
    assert "train.micro_batch_size=16" not in overrides and any(o.startswith("train.micro_batch_size=") for o in overrides)
    predicted = [float(s) for s in re.search(r"\(step ([\d.]+) s .* -> ([\d.]+) s", line).groups()]
    assert main([*args, *(f"--set={o}" for o in overrides)]) == 0
    after = capsys.readouterr().out.splitlines()
    assert after[-2].endswith("compute-bound"), after[-2]
    assert after[-1].startswith("recommended: keep the configured batch split and hpZ")
    assert f"step {predicted[1]:.3f} s" in after[-2] and predicted[1] < predicted[0]


def test_print_config_shows_the_batch_plan_of_the_group():
    """`--print-config` with cluster.num_workers=64 prints the split 64 workers run: the
    configured micro-batch 16 and 4 accumulation steps for the global batch 4096."""
    import yaml

    result = subprocess.run([sys.executable, "-m", "coatnet_scale.pretrain", "--config", "coatnet6",
                             "--set", "cluster.num_workers=64", "--print-config"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert (printed["train"]["micro_batch_size"], printed["train"]["grad_accum_steps"]) == (16, 4)
    assert printed["cluster"]["num_workers"] == 64 and printed["train"]["global_batch_size"] == 4096


def test_compiled_blocks_plan_with_eager_figures_until_a_gpu_measures_them():
    """The compiled-memory hook: no factor is measured yet, so compiled blocks plan as eager and
    the plan says so; a factor supplied here (not a measurement) lowers the activations, frees a
    larger micro-batch and lets `auto` checkpoint fewer blocks; a factor of 1 is eager to the byte."""
    from coatnet_scale.models import MODEL_SPECS
    from coatnet_scale.plan import COMPILED_ACTIVATION_FACTORS, EAGER_NOTE

    assert set(COMPILED_ACTIVATION_FACTORS) == {"mbconv", "transformer"}
    assert all(v is None for v in COMPILED_ACTIVATION_FACTORS.values()), "measured factors need their source file"
    sets = ["model.checkpointing=auto", "cluster.gpu_memory=0.4", "model.image_size=64", "train.micro_batch_size=160",
            "train.global_batch_size=320"]
    eager = plan(load_config("configs/tiny.yaml", sets), 1, 0.4 * GiB, 989.0, 0.4)
    config = load_config("configs/tiny.yaml", [*sets, "model.compile=blocks"])
    unmeasured = plan(config, 1, 0.4 * GiB, 989.0, 0.4)
    assert unmeasured["compiled_memory"] == EAGER_NOTE and eager["compiled_memory"] is None
    assert unmeasured["activations"] == eager["activations"]
    assert unmeasured["largest_micro_batch"] == eager["largest_micro_batch"]
    assert plan(config, 1, 0.4 * GiB, 989.0, 0.4, factors={"mbconv": 1.0, "transformer": 1.0})["activations"] == \
        eager["activations"]

    given = plan(config, 1, 0.4 * GiB, 989.0, 0.4, factors={"mbconv": 0.5, "transformer": 0.5})
    assert given["compiled_memory"] == ("compiled activation memory: mbconv x0.50 (given, not measured), "
                                        "transformer x0.50 (given, not measured)")
    spec = MODEL_SPECS["coatnet_pico"]
    assert len(eager["checkpointing"].policy.chosen(spec)) == 1  # eager needs a block recomputed here...
    assert len(given["checkpointing"].policy.chosen(spec)) == 0  # ...compiled blocks at half the bytes none
    assert given["largest_micro_batch"] > eager["largest_micro_batch"]
    assert given["checkpointing"].note == given["compiled_memory"]
