"""Memory and speed levers (issue 19): `model.checkpointing: auto` chosen by the planner,
channels-last convolutions, compiled blocks; each proven equal on the CPU under ZeRO-3."""
import time
from pathlib import Path

import pytest
import torch

from coatnet_scale.config import ConfigError, load_config
from coatnet_scale.models import MODEL_SPECS
from coatnet_scale.plan import EAGER_NOTE, GiB, checkpointing_policy, describe_choice, main


@pytest.mark.slow
def test_auto_checkpointing_takes_more_blocks_on_less_memory(capsys):
    """CoAtNet-5/6/7 at micro-batch 128 (their configs' own 32/16 fit 40 GiB without any): none on
    a 141 GiB H200, some on 80 GiB, more on 40 GiB, the predicted peak within the budget each time."""
    start = time.monotonic()
    for name, gpus in (("coatnet5", 128), ("coatnet6", 256), ("coatnet7", 256)):
        config = load_config(f"configs/{name}.yaml", ["train.micro_batch_size=128", f"train.global_batch_size={128 * gpus}"])
        assert config.model.checkpointing == "auto"  # the shipped setting
        counts = []
        for memory in (141, 80, 40):
            choice = checkpointing_policy(config, gpus, memory * GiB)
            line = describe_choice(choice, MODEL_SPECS[config.model.name])
            assert line.startswith(f"activation checkpointing: auto, {len(choice.policy.blocks)} of ")
            assert choice.activations <= choice.budget < memory * GiB
            assert choice.note == EAGER_NOTE  # compiled blocks, planned as eager until a GPU measures them
            counts.append(len(choice.policy.blocks))
        assert counts[0] == 0 < counts[1] < counts[2], (name, counts)
    print(f"nine choices in {time.monotonic() - start:.0f}s")
    # The CLI prints the same line, and refuses in one line a device too small for any choice
    # (coatnet_pico at 96 px: the meta replays take a second).
    tiny = ["--config", "configs/tiny.yaml", "--gpus", "1", "--set", "model.checkpointing=auto", "--set",
            "model.image_size=96", "--set", "cluster.num_workers=1", "--set", "cluster.gpu_memory=0.25"]
    capsys.readouterr()
    assert main(tiny) == 0  # cluster.gpu_memory when no --gpu-memory is given
    out = capsys.readouterr().out
    assert "activation checkpointing: auto, 1 of 5 blocks (S1 MBConv 0 (all)); predicted activation peak" in out, out
    assert main([*tiny, "--gpu-memory", "0.2GiB"]) == 1
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and out.startswith("plan: model.checkpointing=auto: coatnet_pico at micro-batch 32 DOES NOT FIT")


def test_auto_checkpointing_on_cpu_workers_needs_a_budget():
    with pytest.raises(ConfigError, match="model.checkpointing=auto on CPU workers needs cluster.gpu_memory"):
        load_config("configs/tiny.yaml", ["model.checkpointing=auto"])
    assert load_config("configs/tiny.yaml", ["model.checkpointing=auto", "cluster.gpu_memory=0.5"]).cluster.gpu_memory == 0.5


def with_a_corrupt_image_per_shard(corpus: Path, dest: Path) -> Path:
    """The demo corpus's training shards with each one's first image zeroed in place (23 of 1438
    samples undecodable; sizes, so offsets, unchanged). Returns the manifest."""
    import shutil
    import tarfile

    shutil.copytree(corpus / "train", dest)
    for shard in sorted(dest.glob("*.tar")):
        with tarfile.open(shard) as tar:
            first = next(m for m in tar if m.name.endswith(".jpg"))
        with open(shard, "r+b") as f:
            f.seek(first.offset_data)
            f.write(b"\0" * first.size)
    return dest / "manifest.json"


def levers_on_rank(rank: int, port: int, corpus: str, train_manifest: str, storage: str, out: str) -> None:
    """One ZeRO-3 rank (fp32, gloo) through the worker loop, several runs in one process."""
    import json
    import logging
    import os
    import shutil
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      DS_ACCELERATOR="cpu")
    from coatnet_scale.engine.worker import Placement, train
    from coatnet_scale.standalone import init_process_group

    init_process_group(use_gpu=False)
    # Exact epochs of 1438 samples: 44 batches of 32 and a last one of 30, which runs eager; the
    # corrupt samples' places are filled, so no compiled block meets another batch size.
    base = [f"storage.url={storage}", f"data.train_manifest={train_manifest}", "data.corrupt_limit=0.05",
            f"data.val_manifest={corpus}/val/manifest.json", "cluster.num_workers=1", "train.global_batch_size=32",
            "train.log_every=1", "monitoring.enabled=false", "checkpoint.at_end=false", "checkpoint.keep=2"]

    def run(name: str, *overrides: str) -> dict:
        final = train(load_config("configs/tiny.yaml", [*base, f"run_name={name}", *overrides]), Placement(0, 1))
        history = [json.loads(f.read_text())["history"] for f in sorted((Path(storage) / name).glob("metrics-step*.json"))]
        return {"final": final, "losses": {h["step"]: h["loss"] for hs in history for h in hs}}

    short = ["train.total_steps=150", "train.stop_at_step=4"]
    results = {"eager": run("eager", *short), "channels_last": run("channels_last", *short, "model.channels_last=true"),
               "eager_checkpointed": run("eager_checkpointed", *short, "model.channels_last=true",
                                         "model.checkpointing.every=1")}
    # Dynamo's reasons for each recompilation, and its warning when a function hits the limit
    # (from which on it runs eager).
    recompiles: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: recompiles.append(record.getMessage())
    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo").addHandler(handler)
    results["compiled"] = run("compiled", "train.total_steps=150", "checkpoint.every_steps=75", "model.channels_last=true",
                              "model.checkpointing.every=1", "model.compile=blocks")
    logging.getLogger("torch._dynamo").removeHandler(handler)
    torch._logging.set_logs()
    from torch._dynamo.utils import counters

    results["dynamo"] = {"graphs": counters["stats"]["unique_graphs"], "recompiles": recompiles}
    # The compiled run's step-75 checkpoint, resumed with every lever off.
    shutil.copytree(Path(storage) / "compiled" / "checkpoints", Path(storage) / "resumed" / "checkpoints")
    shutil.rmtree(Path(storage) / "resumed" / "checkpoints" / "step_000000150")
    results["resumed"] = run("resumed", "train.total_steps=150", "train.stop_at_step=77")
    Path(out).write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_channels_last_and_compiled_blocks_train_equal_under_zero3(demo_corpus, unused_tcp_port, tmp_path):
    """One ZeRO-3 rank on the CPU, fp32: channels-last against NCHW (4 steps); blocks compiled by
    inductor, with channels-last and every block checkpointed, against the same eager (4 steps),
    then trained on to the tiny config's usual accuracy (150 steps of 32 images); its step-75
    checkpoint resumed with both levers off takes steps 76-77 as the compiled run did.

    Tolerances: channels-last changes the order of oneDNN's reductions (the first loss differs
    at 1e-7 relative, measured), so losses agree to 1e-5 relative over 4 steps; inductor fuses
    and reorders more, so compiled against eager 1e-4 relative. Checkpointing changes nothing:
    bit-equal."""
    import json

    import torch.multiprocessing as mp

    out = tmp_path / "levers.json"
    train_manifest = with_a_corrupt_image_per_shard(demo_corpus, tmp_path / "corrupt")
    mp.spawn(levers_on_rank, args=(unused_tcp_port, str(demo_corpus), str(train_manifest), str(tmp_path), str(out)),
             nprocs=1)
    r = json.loads(out.read_text())
    # Corrupt samples (filled) and a short last batch (eager) recompiled nothing for the batch
    # dimension: one graph per block shape (and per recompute), none given up on for eager.
    assert r["compiled"]["final"]["corrupt_samples"] > 0
    recompiles = r["dynamo"]["recompiles"]
    assert r["dynamo"]["graphs"] > 0 and recompiles, "dynamo's recompile log was not captured"
    assert not [m for m in recompiles if "tensor 'x' size mismatch at index 0" in m], recompiles
    assert not [m for m in recompiles if "recompile_limit" in m], recompiles
    eager, channels_last, checkpointed = (r[k]["losses"] for k in ("eager", "channels_last", "eager_checkpointed"))
    compiled, resumed = r["compiled"]["losses"], r["resumed"]["losses"]
    for step in ("1", "2", "3", "4"):
        assert channels_last[step] == pytest.approx(eager[step], rel=1e-5)
        assert checkpointed[step] == channels_last[step]  # recomputation repeats the same kernels
        assert compiled[step] == pytest.approx(checkpointed[step], rel=1e-4)
    assert r["compiled"]["final"]["val_top1"] > 0.85
    assert sorted(resumed, key=int) == ["76", "77"]
    for step in ("76", "77"):
        assert resumed[step] == pytest.approx(compiled[step], rel=1e-4)


def choose_on_rank(rank: int, port: int, memories: list[float], out: str) -> None:
    """One of two gloo ranks whose devices differ: its config names its own memory."""
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from coatnet_scale.engine.worker import activation_checkpointing

    config = load_config("configs/tiny.yaml", ["model.checkpointing=auto", "model.image_size=96",
                                               f"cluster.gpu_memory={memories[rank]}"])
    policy = activation_checkpointing(config, use_gpu=False, bf16=False)
    Path(f"{out}.{rank}").write_text(json.dumps(policy.chosen(MODEL_SPECS[config.model.name])))
    dist.destroy_process_group()


def test_auto_checkpointing_is_one_choice_for_the_group(unused_tcp_port, tmp_path, capfd):
    """Issue 27, item 8: rank 0 sees 1 GiB, rank 1 0.5 GiB. Alone, 1 GiB checkpoints no block and
    0.5 GiB one; together both ranks checkpoint the one block the smaller device needs (a
    different graph per rank would hang ZeRO-3's collectives), and rank 0 says so once."""
    import json

    import torch.multiprocessing as mp

    memories = [1.0, 0.5]
    alone = []
    for memory in memories:
        config = load_config("configs/tiny.yaml", ["model.checkpointing=auto", "model.image_size=96",
                                                   f"cluster.gpu_memory={memory}"])
        alone.append(checkpointing_policy(config, 2, memory * GiB, "cpu", 4).policy.chosen(MODEL_SPECS["coatnet_pico"]))
    assert alone == [[], [0]]
    import coatnet_scale.engine.worker  # noqa: F401  (once, here: the forked ranks inherit it)

    capfd.readouterr()
    mp.start_processes(choose_on_rank, args=(unused_tcp_port, memories, str(tmp_path / "chosen")), nprocs=2,
                       start_method="fork")
    assert [json.loads((tmp_path / f"chosen.{rank}").read_text()) for rank in (0, 1)] == [[0], [0]]
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("activation checkpointing:")]
    assert len(lines) == 1 and lines[0].startswith("activation checkpointing: auto, 1 of 5 blocks"), lines
    assert lines[0].endswith("(the group's smallest device: 0.5 GiB)"), lines
