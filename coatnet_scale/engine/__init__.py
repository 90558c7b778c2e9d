"""The training engine: DeepSpeed ZeRO-3 workers under Ray Train, with separate components
for the optimizer and schedule (optim.py), the DeepSpeed config (zero.py), checkpoints
(checkpoint.py) and the per-worker loop (worker.py). The model code knows none of this."""
