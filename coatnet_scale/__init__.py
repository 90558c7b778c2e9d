"""coatnet_scale: pretrain CoAtNet models at scale with Ray and DeepSpeed ZeRO-3.

The model family lives in `coatnet_scale.models` (plain PyTorch); configuration in
`coatnet_scale.config`.
"""
