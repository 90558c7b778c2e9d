"""Consolidation and export: a ZeRO-3 checkpoint written by 2 ranks becomes whole weights that
give the live model's logits, raw and EMA, from local disk or S3, and load into a model built
at a higher resolution."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from coatnet_scale.models import create_model
from coatnet_scale.models.weights import adapt_state_dict, load_exported

MODEL = {"name": "coatnet_pico_split", "num_classes": 10, "image_size": 64}


def train_and_save(rank: int, world_size: int, port: int, folder: str, results) -> None:
    """Two steps of ZeRO-3 training with an EMA, a checkpoint, then the live model's logits."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu")
    import deepspeed
    import torch.distributed as dist

    from coatnet_scale.engine.checkpoint import Checkpoints
    from coatnet_scale.engine.ema import ShardedEMA

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3},
              "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True}
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = create_model(MODEL["name"], MODEL["num_classes"], MODEL["image_size"])
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=config)
    ema = ShardedEMA(engine.module, decay=0.5)
    torch.manual_seed(1 + rank)  # each rank its own batches: BatchNorm statistics differ per rank
    for _ in range(2):
        loss = engine(torch.randn(4, 3, 64, 64)).logsumexp(1).mean()
        engine.backward(loss)
        engine.step()
        ema.update()
    checkpoints = Checkpoints(folder, {}, keep=1, rank=rank, world_size=world_size, metadata={"model": MODEL})
    checkpoints.save(engine, 2, {"step": 2, "ema": ema.state_dict()})
    def average_batchnorm_statistics():  # as training's evaluation does: one model, every rank's statistics
        for name, buffer in engine.module.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                dist.all_reduce(buffer)
                buffer /= world_size

    engine.eval()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        with ema.applied():
            average_batchnorm_statistics()
            averaged = engine(images)
        average_batchnorm_statistics()
        raw = engine(images)
        again = engine(images)
    if rank == 0:
        results.update(images=images, raw=raw, ema=averaged, again=again)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from conftest import _free_port

    folder = tmp_path_factory.mktemp("zero3") / "checkpoints"
    results = mp.Manager().dict()
    mp.spawn(train_and_save, args=(2, _free_port(), str(folder), results), nprocs=2)
    return folder, dict(results)


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_export_gives_the_live_models_logits(checkpoint, tmp_path, weights):
    from coatnet_scale.export import export

    folder, live = checkpoint
    assert not torch.allclose(live["raw"], live["ema"])  # the EMA really differs from the weights
    assert torch.equal(live["raw"], live["again"])  # the same weights, the EMA swapped out again
    out = tmp_path / "weights.safetensors"
    export(str(folder.parent), str(out), weights)  # the run folder: its newest complete checkpoint
    assert not (tmp_path / "weights.safetensors.partial").exists()
    model = load_exported(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(live["images"]), live[weights], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_consolidates_from_s3(checkpoint, s3_bucket, tmp_path):
    import s3fs

    from coatnet_scale.engine.consolidate import consolidate

    folder, _ = checkpoint
    s3fs.S3FileSystem(skip_instance_cache=True).put(str(folder), f"{s3_bucket}/run/checkpoints", recursive=True)
    remote, marker = consolidate(f"s3://{s3_bucket}/run", {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    local, _ = consolidate(str(folder))
    assert marker["world_size"] == 2 and marker["model"] == MODEL
    assert remote.keys() == local.keys() and all(torch.equal(remote[k], local[k]) for k in local)


@pytest.mark.slow
def test_resized_model_loads_strictly(checkpoint, tmp_path):
    from coatnet_scale.export import export

    folder, _ = checkpoint
    out = tmp_path / "weights.safetensors"
    export(str(folder), str(out), dtype="bf16")
    model = load_exported(str(out), image_size=384)
    tables = {n: p.shape for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")}
    assert tables and all(shape[1] == 2 * 384 // 32 - 1 or shape[1] == 2 * 384 // 16 - 1 for shape in tables.values())
    reference = create_model(MODEL["name"], MODEL["num_classes"], 384)
    assert {n: p.shape for n, p in reference.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(1, 3, 384, 384))).all()


@pytest.mark.slow
def test_incomplete_checkpoint_is_refused(checkpoint, tmp_path):
    import shutil

    from coatnet_scale.engine.consolidate import CheckpointError, consolidate

    folder, _ = checkpoint
    copy = tmp_path / "checkpoints"
    shutil.copytree(folder, copy)
    (next(copy.glob("step_*")) / "COMPLETE.json").unlink()  # as if killed before the marker
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        consolidate(str(tmp_path))


def test_new_classifier_when_the_label_set_changes():
    source = create_model("coatnet_pico", num_classes=21, image_size=32).state_dict()
    target = create_model("coatnet_pico", num_classes=7, image_size=64)
    state, notes = adapt_state_dict(source, 32, target)
    assert "head.weight" not in state and any("new classifier" in n for n in notes)
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected
    with pytest.raises(ValueError, match="shape: head.weight"):
        adapt_state_dict(source, 32, target, new_classifier=False)
    with pytest.raises(ValueError, match="missing|unexpected"):
        adapt_state_dict(source, 32, create_model("coatnet_pico_split", num_classes=21, image_size=32))


@pytest.mark.slow
def test_an_export_serves_as_initial_weights(checkpoint, s3_bucket, tmp_path):
    """--init accepts an export, local or on S3; preflight refuses one of another model."""
    from coatnet_scale.config import load_config
    from coatnet_scale.engine.consolidate import consolidate
    from coatnet_scale.engine.pretrained import read_weights
    from coatnet_scale.export import export
    from coatnet_scale.pretrain import PreflightError, check_initial_weights

    folder, _ = checkpoint
    url = f"s3://{s3_bucket}/exports/pico.safetensors"
    options = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    export(str(folder), url, storage_options=options)
    state, model = read_weights(url, "raw", options)
    expected, _ = consolidate(str(folder))
    assert model == MODEL and all(torch.equal(state[k], expected[k]) for k in expected)
    config = load_config(None, [f"finetune.init_checkpoint={url}", f"storage.url={tmp_path}"])  # trains coatnet_pico
    with pytest.raises(PreflightError, match="holds coatnet_pico_split, but model.name is coatnet_pico"):
        check_initial_weights(config, options)
