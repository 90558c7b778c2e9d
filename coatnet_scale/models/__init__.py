"""CoAtNet models in plain PyTorch: importable without DeepSpeed, Ray or the data stack."""
from coatnet_scale.models.coatnet import (
    MODEL_SPECS,
    Checkpointing,
    CoAtNet,
    attention_order,
    count_flops,
    count_parameters,
    create_model,
    list_models,
    probe_attention,
    resize_relative_position,
    unknown_model,
)

__all__ = [
    "MODEL_SPECS",
    "Checkpointing",
    "CoAtNet",
    "attention_order",
    "count_flops",
    "count_parameters",
    "create_model",
    "list_models",
    "probe_attention",
    "resize_relative_position",
    "unknown_model",
]
