"""The DeepSpeed config generated from ours: ZeRO stage, buckets, hpZ, offload, precision, batch."""
from __future__ import annotations


def deepspeed_config(config, use_gpu: bool) -> dict:
    ds, train = config.deepspeed, config.train
    bf16 = use_gpu if ds.bf16 is None else ds.bf16
    zero: dict = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size,
        "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold,
        "stage3_max_live_parameters": ds.stage3_max_live_parameters,
        "stage3_max_reuse_distance": ds.stage3_max_reuse_distance,
        # ZeRO++ hpZ: DeepSpeed groups ranks [0, n), [n, 2n), ...; Ray Train numbers ranks node
        # by node, so with n dividing each node's worker count a group is one node
        # (coatnet_scale.engine.placement checks it on the real placement).
        "zero_hpz_partition_size": ds.zero_hpz_partition_size,
        # Gathering a 16-bit copy of the whole model at save time would defeat ZeRO-3; the
        # export path consolidates shards offline instead.
        "stage3_gather_16bit_weights_on_model_save": False,
    }
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # We pass our own torch AdamW (parameter groups, any device), also with offload.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
