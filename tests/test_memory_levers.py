"""Memory and speed levers (issue 19): `model.checkpointing: auto` chosen by the planner,
channels-last convolutions, compiled blocks; each proven equal on the CPU under ZeRO-3."""
import time

import pytest

from coatnet_scale.config import ConfigError, load_config
from coatnet_scale.models import MODEL_SPECS
from coatnet_scale.plan import GiB, checkpointing_policy, describe_choice, main


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
