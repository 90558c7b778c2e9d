"""The capacity planner: model-state memory against DeepSpeed's own estimator, activations
from the model's shapes, and the fit verdict."""
import subprocess
import sys

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

from coatnet_scale.config import load_config
from coatnet_scale.models import Checkpointing
from coatnet_scale.plan import GiB, activation_profile, plan


@pytest.mark.parametrize("gpus", [8, 256])
def test_model_states_match_deepspeed_estimator(gpus):
    config = load_config("configs/coatnet7.yaml")
    ours = plan(config, gpus, 80 * GiB, 989.0, 0.45)
    nodes = gpus // 8
    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(
        ours["params"], ours["largest_layer"], num_gpus_per_node=8, num_nodes=nodes, cpu_offload=False,
        cpu_offload_params=False,
    )
    assert ours["state_total"] == pytest.approx(gpu_bytes, rel=0.01)


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
    too_small = subprocess.run([sys.executable, "-m", "coatnet_scale.plan", "--config", "configs/coatnet7.yaml",
                                "--gpus", "1", "--gpu-memory", "16GiB"], capture_output=True, text=True)
    assert too_small.returncode == 1 and "DOES NOT FIT" in too_small.stdout
