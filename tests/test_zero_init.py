"""Models build under deepspeed.zero.Init: each of 2 ranks holds only its half of the weights."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from coatnet_scale.models import count_parameters, create_model


def build_on_rank(rank: int, world_size: int, port: int, name: str, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu",
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=torch.float32):
        model = create_model(name, num_classes=1000, image_size=224)
    params = list(model.parameters())
    results[rank] = {
        "full": sum(p.ds_numel for p in params),
        "local": sum(p.ds_tensor.numel() for p in params),
        "materialised": sum(p.numel() for p in params),  # 0 when every weight is partitioned away
        "tensors": len(params),
    }
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coatnet_pico_split", "coatnet_0"])
def test_zero_init_partitions_weights(name, unused_tcp_port):
    world_size = 2
    results = mp.Manager().dict()
    mp.spawn(build_on_rank, args=(world_size, unused_tcp_port, name, results), nprocs=world_size)
    with torch.device("meta"):
        expected = count_parameters(create_model(name))
    for rank in range(world_size):
        r = results[rank]
        assert r["full"] == expected
        assert r["materialised"] == 0
        # Each rank's shard is half of every tensor, rounded up: half the total, give or take one
        # element per tensor.
        assert expected / 2 <= r["local"] <= expected / 2 + r["tensors"]
