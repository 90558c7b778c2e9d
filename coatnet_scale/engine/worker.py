"""The training loop every worker runs: build the model sharded under ZeRO-3, resume from the
newest complete checkpoint, train, evaluate, checkpoint.

One loop, two launchers: `train_worker` is what Ray Train runs (the user's path, with restarts
and elastic groups), and coatnet_scale/standalone.py runs `train` in plain torch.distributed
processes (one process, or one per GPU under torchrun) for hosts that have PyTorch and little
else. Ray, s3fs and the monitoring stack are imported only when used.

Precision. With bf16 the parameters are bf16 (zero.Init builds them so) and so are the inputs:
DeepSpeed casts inputs only for fp16. Loss and BatchNorm run in fp32, and the EMA follows the
optimizer's fp32 master weights (engine/ema.py).

Bit-for-bit resume: a checkpoint is taken between optimizer steps and holds, besides
DeepSpeed's partitioned model/optimizer/scheduler state, each rank's RNG states and loader
position (epoch, batches consumed in it); the loader replays nothing and skips nothing (see
coatnet_scale/data/loader.py), so N steps + resume + N steps equals 2N straight steps.
"""
from __future__ import annotations

import gc
import json
import math
import socket
import time
import warnings
from dataclasses import astuple, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from coatnet_scale.batch import apply_batch_plan, batch_plan
from coatnet_scale.config import Config, TrainConfig
from coatnet_scale.data import eval_loader, train_loader
from coatnet_scale.data.plan import Phase, derive_seed
from coatnet_scale.engine import collectives
from coatnet_scale.engine.checkpoint import Checkpoints, clean_stale_staging
from coatnet_scale.engine.compiled import compile_blocks
from coatnet_scale.engine.ema import ShardedEMA
from coatnet_scale.engine.failures import FailureLog
from coatnet_scale.engine.faults import Faults
from coatnet_scale.engine.health import Agreed, Health, Rollback, read_rollbacks
from coatnet_scale.engine.interrupt import Notices, drain_line, signal_received
from coatnet_scale.engine.monitor import start_training_monitor
from coatnet_scale.engine.optim import group_weight_decays, lr_multiplier, param_groups
from coatnet_scale.engine.placement import placement_problems
from coatnet_scale.engine.pretrained import load_initial_weights
from coatnet_scale.engine.watchdog import Watchdog
from coatnet_scale.engine.zero import deepspeed_config
from coatnet_scale.models import MODEL_SPECS, Checkpointing, attention_order, create_model, probe_attention
from coatnet_scale.models.coatnet import BatchNorm2d
from coatnet_scale.plan import GiB, checkpointing_policy, describe_choice
from coatnet_scale.storage import storage_options, url_to_fs


@dataclass(frozen=True)
class Placement:
    """Where a worker runs, as its launcher knows it."""

    rank: int
    world_size: int
    local_rank: int = 0
    node: str = socket.gethostname()  # what tells nodes apart: Ray's node id, or the host name
    job: str | None = None  # restarts of one job share it; None for a launcher that never restarts


def run_url(config: Config) -> str:
    return f"{config.storage.url.rstrip('/')}/{config.run_name}"


def checkpoint_url(config: Config) -> str:
    return f"{run_url(config)}/checkpoints"


def checkpoint_metadata(config: Config) -> dict:
    """What every checkpoint marker records besides its files: enough for consolidation,
    evaluation and the hand-off to know the model, for a fine-tune to know its origin, and for
    people to see the batch and learning rate the group ran with (an elastic group may differ
    from the config)."""
    t = config.train
    return {"model": config.model.model_dump(mode="json"), "ema": t.ema_decay > 0,
            "init_checkpoint": config.finetune.init_checkpoint, "eval_crop_ratio": config.data.eval_crop_ratio,
            "batch": {"global": t.global_batch_size, "micro": t.micro_batch_size, "accumulation": t.grad_accum_steps,
                      "lr": t.lr}}


def soft_target_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    logits = logits.float()
    if kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(logits)
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def build_engine(config: Config, use_gpu: bool, initial_weights: bool = False, load_universal: bool = False):
    """The DeepSpeed engine, its model built inside zero.Init so no process holds it whole, and
    loaded from `finetune.init_checkpoint` when `initial_weights`; `load_universal` readies it to
    load a checkpoint of another world size (DeepSpeed's universal format)."""
    import deepspeed

    # Ray Train has initialised torch.distributed already; DeepSpeed adopts that process group.
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", verbose=False)
    ds_config = deepspeed_config(config, use_gpu)
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    m = config.model
    checkpointing = activation_checkpointing(config, use_gpu, ds_config["bf16"]["enabled"])
    attention_kernel(config, use_gpu, ds_config["bf16"]["enabled"])
    torch.manual_seed(config.train.seed)  # the same initial weights whatever the world size
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=config.deepspeed.zero_stage == 3):
        model = create_model(m.name, m.num_classes, m.image_size, m.drop_path_rate, checkpointing, m.channels_last,
                             m.attention_backend)
    if m.compile == "blocks":
        compiled = compile_blocks(model, use_gpu, config.train.micro_batch_size)
        if dist.get_rank() == 0:
            print(f"model.compile=blocks: {compiled} blocks compiled (inductor), each a ZeRO-3 leaf", flush=True)
    if initial_weights:
        notes = load_initial_weights(model, config, storage_options(config.storage), dist.get_rank())
        if dist.get_rank() == 0:
            print("initial weights: " + "; ".join(notes), flush=True)
    for module in model.modules():  # zero.Init made them bf16; fp32 before a checkpoint loads into them
        if isinstance(module, BatchNorm2d):
            module.fp32_statistics()
    t = config.train
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.999))
    min_ratio = t.min_lr / t.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, t.warmup_steps, t.total_steps, t.schedule, min_ratio)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, scheduler


def activation_checkpointing(config: Config, use_gpu: bool, bf16: bool) -> Checkpointing:
    """`model.checkpointing` as configured or, for auto, the planner's choice for the smallest
    device memory of the group (cluster.gpu_memory for CPU workers), so every rank builds the
    same model, at this group's size and micro-batch; rank 0 logs it with the predicted
    activation peak."""
    if use_gpu:
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    else:
        memory = (config.cluster.gpu_memory or 0) * GiB
    memory = collectives.smallest(memory)
    choice = checkpointing_policy(config, dist.get_world_size(), memory, "cuda" if use_gpu else "cpu", 2 if bf16 else 4)
    if dist.get_rank() == 0:
        print(describe_choice(choice, MODEL_SPECS[config.model.name])
              + (f" (the group's smallest device: {memory / GiB:.3g} GiB)" if choice.auto else ""), flush=True)
    return choice.policy


def attention_kernel(config: Config, use_gpu: bool, bf16: bool) -> None:
    """Which attention kernel model.attention_backend runs here, found by running it once on this
    device (every rank: one without a kernel fails here, not in its first step); rank 0 logs it."""
    m = config.model
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    tokens = (m.image_size // 16) ** 2  # stage 3's grid
    ran = probe_attention(m.attention_backend, device, torch.bfloat16 if bf16 else torch.float32,
                          MODEL_SPECS[m.name].head_dim, tokens)
    if dist.get_rank() == 0:
        print(f"attention: model.attention_backend={m.attention_backend} runs {ran} on {device.type} (tried "
              f"{', '.join(attention_order(m.attention_backend, device))} in that order, at {tokens} tokens)", flush=True)


def input_dtype(engine) -> torch.dtype:
    """What the model's first layer computes in: DeepSpeed casts inputs for fp16 only."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


class _InfiniteGradient(torch.autograd.Function):
    """The identity forward, an infinite gradient backward (fault injection: a step DeepSpeed skips)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def forward_backward(engine, images: torch.Tensor, targets: torch.Tensor, loss_kind: str,
                     poison: bool = False, infinite: bool = False) -> torch.Tensor:
    """One micro-batch, on the device (`StreamingLoader.to_device`), through the engine (forward,
    backward, and the optimizer step at the end of an accumulation); returns the loss, detached.
    `poison`: a NaN loss; `infinite`: infinite gradients, the loss finite (fault injection,
    engine/faults.py)."""
    logits = engine(images)
    loss = soft_target_loss(logits, targets, loss_kind)
    if poison:
        loss = loss * float("nan")
    if infinite:
        loss = _InfiniteGradient.apply(loss)
    engine.backward(loss)
    engine.step()
    return loss.detach()


class EpochBatches:
    """The training batches in order across epochs, and where reading stands (epoch, batches
    read in it, the phases of a resized epoch) for the checkpoint."""

    def __init__(self, loader, epoch: int, batch_in_epoch: int = 0, phases: tuple = ()):
        self.loader, self.epoch, self.batch_in_epoch, self.phases = loader, epoch, batch_in_epoch, phases
        self._batches = iter(loader.epoch(epoch, batch_in_epoch, phases))

    def __next__(self) -> dict:
        batch = next(self._batches, None)
        if batch is None:  # the epoch is over: every rank reaches this at the same step
            self.epoch, self.batch_in_epoch, self.phases = self.epoch + 1, 0, ()
            self._batches = iter(self.loader.epoch(self.epoch))
            batch = next(self._batches)
        self.batch_in_epoch += 1
        return batch


@dataclass
class StepCounts:
    """What one optimizer step read and how it went, for the log window."""

    loss: float
    data_wait: float
    images: int  # a slot's last batch may be smaller than the micro-batch
    corrupt: int


def train_step(engine, scheduler, batches: EpochBatches, device: torch.device, train: TrainConfig, monitor,
               ema: ShardedEMA | None, step: int, poison: bool = False, infinite: bool = False) -> StepCounts:
    """Optimizer step `step`: grad_accum_steps micro-batches read, put on the device, forward and
    backward (DeepSpeed steps the optimizer and schedule after the last), the EMA updated, the
    monitor told."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    counts = StepCounts(0.0, 0.0, 0, 0)
    for _ in range(train.grad_accum_steps):
        wait_start = time.monotonic()
        batch = next(batches)
        counts.data_wait += time.monotonic() - wait_start
        monitor.batch(wait_start, batch)
        counts.images += len(batch["labels"])
        counts.corrupt += batch["corrupt"]
        loss_sum += forward_backward(engine, *batches.loader.to_device(batch, device, input_dtype(engine)), train.loss,
                                     poison, infinite)
    trim_module_stack(engine)
    if ema is not None:
        ema.update()
    counts.loss = loss_sum.item() / train.grad_accum_steps
    monitor.step(step, batches.epoch, counts.loss, scheduler.get_last_lr()[0], engine.get_global_grad_norm())
    return counts


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _restore_hyperparameters(engine, scheduler, config: Config, step: int) -> None:
    """After a universal load: DeepSpeed copied param_groups[0]'s hyperparameters into every
    group, so put back each group's weight decay, and the learning rate of this group's batch."""
    t = config.train
    multiplier = lr_multiplier(step, t.warmup_steps, t.total_steps, t.schedule, t.min_lr / t.lr)
    scheduler.base_lrs = [t.lr] * len(scheduler.base_lrs)
    for group, weight_decay in zip(engine.optimizer.param_groups, group_weight_decays(t.weight_decay)):
        group.update(weight_decay=weight_decay, initial_lr=t.lr, lr=t.lr * multiplier)


def evaluate(engine, loader, device) -> dict:
    """Top-1/top-5 over the whole validation set, summed across ranks (every rank runs the same
    number of batches, so ZeRO-3's collective forward never waits on a rank that has finished)."""
    # Each rank's BatchNorm statistics come from its own batches; evaluate all ranks with the
    # average, as one model, then put each rank's own back (training state stays untouched).
    statistics = [b for n, b in engine.module.named_buffers() if n.endswith(("running_mean", "running_var"))]
    own = [b.clone() for b in statistics]
    for buffer in statistics:
        collectives.all_reduce(buffer)
        buffer /= dist.get_world_size()
    engine.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, samples
    with torch.no_grad():
        for batch in loader.epoch(0):
            images, labels = loader.to_device(batch, device, input_dtype(engine))
            logits = engine(images).float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            counts[0] += (top5[:, 0] == labels).sum()
            counts[1] += (top5 == labels[:, None]).any(dim=1).sum()
            counts[2] += len(labels)
    collectives.all_reduce(counts)
    for buffer, saved in zip(statistics, own):
        buffer.copy_(saved)
    engine.train()
    return {"top1": (counts[0] / counts[2]).item(), "top5": (counts[1] / counts[2]).item(), "samples": int(counts[2])}


def evaluate_with_ema(engine, loader, device, ema: ShardedEMA | None) -> dict:
    """Top-1/top-5 of the raw weights and, with an EMA, of the averaged ones (ema_top1, ema_top5)."""
    result = evaluate(engine, loader, device)
    if ema is not None:
        with ema.applied():
            averaged = evaluate(engine, loader, device)
        result.update(ema_top1=averaged["top1"], ema_top5=averaged["top5"])
    return result


def describe(result: dict) -> str:
    text = f"top-1 {result['top1']:.4f} top-5 {result['top5']:.4f}"
    if "ema_top1" in result:
        text += f", EMA top-1 {result['ema_top1']:.4f} top-5 {result['ema_top5']:.4f}"
    return f"{text} ({result['samples']} images)"


def train(config: Config, placement: Placement, report=None, preemption_info=None) -> dict:
    """The loop, on one rank of an initialised torch.distributed group. Returns the final
    figures (and hands them to `report` before monitoring lingers); a job that stopped
    retrying a repeated error returns {"stopped": reason} without training; one that saved on
    a stop signal returns them with "interrupted" (engine/interrupt.py). `preemption_info`:
    ray.train.get_preemption_info under Ray."""
    # DeepSpeed calls torch.distributed APIs that warn on every collective.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    rank = placement.rank
    options = storage_options(config.storage)
    watchdog = Watchdog(run_url(config), options, placement.job, rank)
    watchdog.arm(config.train.startup_timeout_s)
    if rank == 0:
        print(f"watchdog: a rank whose step takes over {config.train.hang_timeout_s:g} s (the first "
              f"{config.train.startup_timeout_s:g} s) dumps its stacks to {watchdog.url}/ and exits", flush=True)
    try:
        return _attempts(config, placement, options, watchdog, report,
                         Notices(preemption_info, config.checkpoint.preemption_poll_steps))
    finally:
        watchdog.close()


def _attempts(config: Config, placement: Placement, options: dict, watchdog: Watchdog, report,
              notices: Notices) -> dict:
    """Train, starting again from the newest complete checkpoint after each rollback."""
    rank, world_size = placement.rank, placement.world_size
    use_gpu = config.cluster.use_gpu
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    collectives.bind(device)
    if not use_gpu:
        torch.set_num_threads(max(1, int(config.cluster.cpus_per_worker)))
    clean_stale_staging()  # what a crashed process of this host left in the middle of a save
    checkpoints = Checkpoints(checkpoint_url(config), options, config.checkpoint.keep, rank, world_size,
                              metadata=checkpoint_metadata(config), local_rank=placement.local_rank,
                              async_upload=config.checkpoint.async_upload)
    tag, marker = checkpoints.choose()
    finished = finished_report(config, marker)
    if finished is not None:  # e.g. Ray restarting a group after the last step: nothing to redo
        if rank == 0:
            print(f"run {config.run_name} already finished at step {finished['step']} ({checkpoints.url}/{tag}): "
                  f"nothing to do", flush=True)
        return _reported(report, finished)
    nodes = [placement.node]  # every rank's node, by rank
    if world_size > 1:
        nodes = [None] * world_size
        dist.all_gather_object(nodes, placement.node)
    failures = FailureLog(run_url(config), options, placement.job)
    attempt, stop = failures.start(tag, rank, nodes, override=config.train.override_stop)
    if stop is not None:
        if rank == 0:
            print(f"stopping: {stop}", flush=True)
        return _reported(report, {"stopped": stop})
    progress = {"step": 0}  # where a failure happened, for its record
    try:
        problems = placement_problems(config, nodes)  # what only the placed workers can see
        if problems:
            raise RuntimeError("; ".join(problems))
        final = _rolling_back(config, placement, device, checkpoints, tag, marker, report, progress, watchdog, nodes,
                              notices)
        if "stopped" in final and rank == 0:
            failures.stop(final["stopped"])  # what the Ray driver reads, and what keeps the run stopped
        return final
    except Exception as error:
        failures.record(attempt, rank, progress["step"], error)
        raise


def _rolling_back(config: Config, placement: Placement, device: torch.device, checkpoints: Checkpoints,
                  tag: str | None, marker: dict | None, report, progress: dict, watchdog: Watchdog,
                  nodes: list[str], notices: Notices) -> dict:
    """Attempts in these processes: after each rollback, the next from the newest complete
    checkpoint (the one the rollback record names)."""
    faults = Faults(run_url(config), storage_options(config.storage), placement.rank)
    checkpoints.faults = faults
    monitors: list = []  # one for every attempt: a rollback is not a new worker group
    while True:
        try:
            return _train(config, placement, device, checkpoints, tag, marker, report, progress, watchdog, nodes,
                          faults, monitors, notices)
        except Rollback:
            watchdog.arm(config.train.startup_timeout_s)  # not the step's timeout: the discard may wait
            checkpoints.discard()  # bounded: a slow store must not stall the rollback
        gc.collect()  # the attempt's engine and loaders (the exception held them), before the next is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        tag, marker = checkpoints.choose()


def _reported(report, final: dict) -> dict:
    if report is not None:
        report(final)
    return final


def finished_report(config: Config, marker: dict | None) -> dict | None:
    """The final figures of a run whose newest complete checkpoint is its last step and whose
    final report exists; None when there is training or evaluation left to do."""
    if marker is None or marker["step"] < config.train.total_steps:
        return None
    fs, path = url_to_fs(run_url(config), storage_options(config.storage))
    try:
        return json.loads(fs.cat_file(f"{path}/metrics-step{marker['step']:09d}.json"))["final"]
    except (FileNotFoundError, KeyError, ValueError):
        return None


def _train(config: Config, placement: Placement, device: torch.device, checkpoints: Checkpoints, tag: str | None,
           marker: dict | None, report, progress: dict, watchdog: Watchdog, nodes: list[str], faults: Faults,
           monitors: list, notices: Notices) -> dict:
    """One attempt: the engine built and resumed, the data positioned, the steps run."""
    rank, world_size = placement.rank, placement.world_size
    config = _group_config(config, world_size, checkpoints, rank)
    resized = marker is not None and marker["world_size"] != world_size
    engine, scheduler = build_engine(config, config.cluster.use_gpu,
                                     initial_weights=tag is None and bool(config.finetune.init_checkpoint),
                                     load_universal=resized)
    try:
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in engine.module.parameters())
        full = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        if rank == 0:
            print(f"ZeRO-{config.deepspeed.zero_stage}: rank 0 holds {local:,} of {full:,} parameters ({local / full:.1%})", flush=True)
        step, epoch, batch_in_epoch, state = _resume(config, engine, scheduler, checkpoints, tag, marker, rank,
                                                     world_size)
        progress["step"] = step
        # The EMA starts from the weights training starts from: initial, loaded, or resumed.
        ema = ShardedEMA(engine.module, config.train.ema_decay, engine.optimizer) if config.train.ema_decay else None
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        loader = train_loader(config, rank, world_size)
        validation = eval_loader(config, rank, world_size) if config.data.val_manifest else None
        group, epoch, batch_in_epoch, phases = _data_position(config, loader, state, epoch, batch_in_epoch,
                                                              world_size)
        health = _health(config, placement, nodes, device, tag, step)
        t = config.train
        loaded = {"manifest": config.data.train_manifest, "seed": t.seed, "shuffle_buffer": config.data.shuffle_buffer,
                  "world_size": world_size, "num_workers": config.data.num_workers, "batch_size": t.micro_batch_size}
        epoch, batch_in_epoch, phases = health.skip(loader, loaded, t.grad_accum_steps, epoch, batch_in_epoch, phases)
        batches = EpochBatches(loader, epoch, batch_in_epoch, phases)
        if monitors:
            monitor = monitors[0]
            monitor.resumed(step, epoch)
        else:
            monitor = start_training_monitor(config, rank, world_size, device, step, epoch,
                                             recomputes=engine.module.checkpointing.enabled)
            monitors.append(monitor)
        health.started(monitor)
        return StepLoop(config, placement, engine, scheduler, checkpoints, batches, validation, ema, monitor, health,
                        watchdog, faults, notices, group, report, progress).run(step)
    finally:
        release_engine(engine)


def _group_config(config: Config, world_size: int, checkpoints: Checkpoints, rank: int) -> Config:
    """The config with the batch this group's size runs (an elastic group, or a resize)."""
    c, t = config.cluster, config.train
    plan = batch_plan(t, world_size, c.num_workers, c.min_workers or c.num_workers)
    if (plan.micro_batch_size, plan.grad_accum_steps, plan.global_batch_size) != (
            t.micro_batch_size, t.grad_accum_steps, t.global_batch_size):
        config = apply_batch_plan(config, plan)
        checkpoints.metadata = checkpoint_metadata(config)
        if rank == 0:
            print(f"elastic: {plan.describe(t.global_batch_size)}", flush=True)
    return config


def _resume(config: Config, engine, scheduler, checkpoints: Checkpoints, tag: str | None, marker: dict | None,
            rank: int, world_size: int) -> tuple[int, int, int, dict]:
    """(step, epoch, batch_in_epoch, trainer state) from checkpoint `tag`, its RNG states set;
    from the start when `tag` is None."""
    if tag is None:
        torch.manual_seed(config.train.seed * 1000 + rank + 1)  # stochastic depth differs per rank
        return 0, 0, 0, {}
    resized = marker["world_size"] != world_size
    state = checkpoints.load(engine, tag, marker)
    step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    if state["rng"] is not None:
        _set_rng_state(state["rng"])
    else:  # a rank the checkpoint had no state for
        torch.manual_seed(derive_seed(config.train.seed, rank, step))  # the same for the same rank and step
    if resized:
        _restore_hyperparameters(engine, scheduler, config, step)
    if rank == 0:
        print(f"resumed from {checkpoints.url}/{tag}: step {step}, epoch {epoch}, batch {batch_in_epoch}"
              + (f", written by {marker['world_size']} workers, now {world_size}" if resized else "")
              + "".join(f", saved on a {why} notice" for why in ("preemption", "signal") if why in marker),
              flush=True)
    return step, epoch, batch_in_epoch, state


def _data_position(config: Config, loader, state: dict, epoch: int, batch_in_epoch: int,
                   world_size: int) -> tuple[list, int, int, tuple]:
    """(data group, epoch, batch_in_epoch, phases) where this group's reading starts. The data
    group: who reads this epoch's samples. A group of another shape continues the epoch with the
    samples the earlier groups (phases) left, each still read once."""
    group = [world_size, config.data.num_workers, config.train.micro_batch_size]
    phases = tuple(Phase(*p) for p in state.get("phases", ()))
    return (group, *loader.continue_from(epoch, batch_in_epoch, phases, state.get("data_group")))


def _health(config: Config, placement: Placement, nodes: list[str], device: torch.device, tag: str | None,
            step: int) -> Health:
    """This attempt's run health, with the run's rollback records (rank 0 reads them)."""
    rank, world_size = placement.rank, placement.world_size
    records = [read_rollbacks(run_url(config), storage_options(config.storage)) if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(records, src=0)
    return Health(config, run_url(config), storage_options(config.storage), rank, world_size, nodes, device, tag, step,
                  records[0])


def _pop_module_stack(engine, keep_model: bool) -> None:
    """Takes off ZeRO-3's global stack of modules in forward what sits above the engine's model
    (at its bottom), and the model too unless `keep_model`."""
    from deepspeed.runtime.zero import parameter_offload

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", [])
    bottom = next((i for i, m in enumerate(stack) if m is engine.module), None)
    if bottom is not None:
        del stack[bottom + keep_model:]


def trim_module_stack(engine) -> None:
    """Between steps only the model belongs on ZeRO-3's module stack. A checkpointed block's
    recompute stops early (torch's early stop), so the modules it pushed are never popped: the
    stack grew by about three modules per checkpointed block per step, and DeepSpeed registers
    a dangling parameter on the module at its top."""
    _pop_module_stack(engine, keep_model=True)


def release_engine(engine) -> None:
    """Lets the engine's memory go. Without this each rollback, and each run in one process
    (gpu_proof), kept a whole engine on the device (measured on an H200: 5-11 GiB of CoAtNet-5
    per run): its hooks hold it, and ZeRO-3 leaves the model at the bottom of its module stack."""
    engine.destroy()
    _pop_module_stack(engine, keep_model=False)


@dataclass
class LogWindow:
    """Sums over the steps since the last log line."""

    start: float = field(default_factory=time.monotonic)
    steps: int = 0
    wait: float = 0.0
    images: int = 0

    def add(self, counts: StepCounts, agreed: Agreed) -> None:
        self.steps, self.wait, self.images = self.steps + 1, self.wait + counts.data_wait, self.images + agreed.images


class StepLoop:
    """One attempt's steps. After each, the group agrees on how it went (`Health.agree`, one
    all-reduce, an `Agreed`), and every rank acts on the same verdict, in this order: stop or
    roll back (`_roll_back`, `_stop`), settle the save in flight (`_drop_failed_save`,
    `_commit`), log and evaluate, take up a stop signal or reclaim notice (`_drain`), save
    (`_save`). docs/engine.md, "The step protocol", has the table."""

    def __init__(self, config: Config, placement: Placement, engine, scheduler, checkpoints: Checkpoints,
                 batches: EpochBatches, validation, ema, monitor, health: Health, watchdog: Watchdog, faults: Faults,
                 notices: Notices, group: list, report, progress: dict):
        self.config, self.t, self.rank = config, config.train, placement.rank
        self.engine, self.scheduler, self.checkpoints, self.batches = engine, scheduler, checkpoints, batches
        self.validation, self.ema, self.monitor, self.health = validation, ema, monitor, health
        self.watchdog, self.faults, self.notices, self.group = watchdog, faults, notices, group
        self.report, self.progress = report, progress
        self.last_step = min(self.t.total_steps, self.t.stop_at_step or self.t.total_steps)
        self.window, self.corrupt = LogWindow(), 0
        self.last_save_error = ""
        self.last_metrics: dict = {}
        self.history: list[dict] = []
        checkpoints.on_complete = lambda saved: _checkpoint_complete(saved, checkpoints.url, self.rank, health,
                                                                      monitor, notices)
        checkpoints.on_failed = self._save_failed

    def run(self, step: int) -> dict:
        try:
            return self._steps(step)
        finally:  # the checkpoints outlive this attempt; its loaders must not (their workers end with them)
            self.checkpoints.on_complete = self.checkpoints.on_failed = None

    def _steps(self, step: int) -> dict:
        while step < self.last_step:
            step += 1
            counts, compute = self._train_step(step)
            self.progress["step"] = step
            agreed = self.health.agree(step, counts.loss, self.engine.get_global_grad_norm(),
                                       self.engine.was_step_applied(), counts.corrupt, counts.images, compute,
                                       self.checkpoints.upload_state(), signal_received() is not None)
            stop = self._roll_back(agreed) or self._settle_upload(agreed)
            if stop is not None:
                return self._stop(step, stop)
            self.watchdog.arm(self.t.hang_timeout_s)
            self._log(agreed, counts)
            self._evaluate(step)
            note = self._drain(agreed)
            stop = self._save(step, note)
            if stop is not None:
                return self._stop(step, stop)
            if note is not None and "signal" in note:
                self.monitor.linger_seconds = 0  # the signal's sender waits for this process to end
                self.last_metrics["interrupted"] = note["signal"]
                break
        return self._finish(step)

    def _train_step(self, step: int) -> tuple[StepCounts, float]:
        """Step `step` (with the injected faults, engine/faults.py); its counts and compute time."""
        self.faults.hang(step)
        started = time.monotonic()
        counts = train_step(self.engine, self.scheduler, self.batches, self.health.device, self.t, self.monitor,
                            self.ema, step, self.faults.nan(step), self.faults.inf_grad(step))
        self.faults.delay(step)
        return counts, time.monotonic() - started - counts.data_wait

    def _roll_back(self, agreed: Agreed) -> str | None:
        """Trouble: roll back (raises Rollback), or, past train.max_rollbacks, why the run stops."""
        return None if agreed.trouble is None else self.health.roll_back(agreed.step, agreed.trouble)

    def _settle_upload(self, agreed: Agreed) -> str | None:
        """The save in flight: marked once stored on every rank, dropped on every rank once one
        failed; too many failed in a row stop the run (the reason is returned)."""
        if agreed.upload == "stored":
            self._commit()
        elif agreed.upload == "failed":
            self._drop_failed_save()
        return self._failed_saves_stop()

    def _commit(self) -> None:
        self.checkpoints.commit()

    def _drop_failed_save(self) -> None:
        self.watchdog.arm(self.t.startup_timeout_s)  # the others' uploads are stopped and waited for (bounded)
        self.checkpoints.drop()

    def _failed_saves_stop(self) -> str | None:
        limit = self.config.checkpoint.max_failed_saves
        if self.checkpoints.failed_in_a_row < limit:
            return None
        return (f"{self.checkpoints.failed_in_a_row} checkpoint saves in a row could not be stored in "
                f"{self.checkpoints.url} (checkpoint.max_failed_saves {limit}); the last: {self.last_save_error}")

    def _save_failed(self, saved, errors: list[tuple[int, str]]) -> None:
        """Checkpoints.on_failed: a save dropped on every rank. Counted; rank 0 names each rank
        that failed and its error."""
        self.monitor.checkpoint_failed()
        self.last_save_error = "; ".join(f"rank {r}: {e}" for r, e in errors) or "its upload was stopped"
        if self.rank == 0:
            print(f"checkpoint step {saved.step} dropped on every rank (no marker; its files removed): "
                  f"{self.last_save_error}; {self.checkpoints.failed_in_a_row} save(s) in a row failed "
                  f"(checkpoint.max_failed_saves {self.config.checkpoint.max_failed_saves}); the next save tries "
                  f"again", flush=True)

    def _stop(self, step: int, reason: str) -> dict:
        """The run stops on purpose (exit 78; engine/failures.py records it so it stays stopped)."""
        self.checkpoints.discard()
        if self.rank == 0:
            print(f"stopping: {reason}", flush=True)
        final = {**self.last_metrics, "step": step, "stopped": reason}
        if self.report is not None:
            self.report(final)
        self.monitor.close()
        return final

    def _log(self, agreed: Agreed, counts: StepCounts) -> None:
        """The log window's sums; every `train.log_every` steps a line, figures and history."""
        self.window.add(counts, agreed)
        self.corrupt += agreed.corrupt
        step, w = agreed.step, self.window
        if step % self.t.log_every and step != self.last_step:
            return
        elapsed = time.monotonic() - w.start
        self.last_metrics = {
            "step": step, "epoch": self.batches.epoch, "loss": agreed.loss, "lr": self.scheduler.get_last_lr()[0],
            "images_per_second": w.images / elapsed, "step_seconds": elapsed / w.steps,
            "data_wait_fraction": w.wait / elapsed, "corrupt_samples": self.corrupt,
        }
        if self.health.device.type == "cuda":  # what the planner predicts (python -m coatnet_scale.plan)
            self.last_metrics["max_memory_allocated"] = torch.cuda.max_memory_allocated(self.health.device)
        self.history.append(self.last_metrics)
        self.monitor.log()
        if self.rank == 0:
            m = self.last_metrics
            print(f"step {step}/{self.t.total_steps} loss {m['loss']:.4f} lr {m['lr']:.2e} "
                  f"{m['images_per_second']:.1f} img/s step {m['step_seconds']:.3f}s "
                  f"data-wait {m['data_wait_fraction']:.0%}", flush=True)
        self.window = LogWindow()

    def _evaluate(self, step: int) -> None:
        t = self.t
        if self.validation is None or not t.eval_every or step % t.eval_every or step >= self.last_step:
            return
        self.watchdog.arm(t.startup_timeout_s)
        result = evaluate_with_ema(self.engine, self.validation, self.health.device, self.ema)
        self.monitor.evaluated(result)
        self.watchdog.arm(t.hang_timeout_s)
        if self.rank == 0:
            print(f"eval step {step}: {describe(result)}", flush=True)

    def _drain(self, agreed: Agreed) -> dict | None:
        """A stop signal (any rank's, from the all-reduce) or a new reclaim notice: what the
        marker of the checkpoint saved now records, or None. One that comes while steps are
        skipped waits in `notices.pending` (which outlives a rollback) for the next step that
        is not: a drain is never lost."""
        n, step = self.notices, agreed.step
        if n.pending is None:
            n.pending = _interruption(agreed.signalled, n.new(step))
            if n.pending is not None:
                n.pending_text = _describe_drain(n.pending, agreed.signalled, n)
                if "preemption" in n.pending:
                    self.monitor.preempted()
                if not self.health.healthy and self.rank == 0:
                    print(f"{n.pending_text}: step {step} was skipped, so the checkpoint waits for the next step "
                          f"that is not", flush=True)
        if n.pending is None or not self.health.healthy:
            return None
        note, n.pending = n.pending, None
        if self.rank == 0:
            print(drain_line(n.pending_text, note, step), flush=True)
        return note

    def _save(self, step: int, note: dict | None) -> str | None:
        """A checkpoint when due: every checkpoint.every_steps, the last step, a drain (`note`).
        The last and a drain's wait for their marker, retried at once when dropped; others
        upload in the background (when on). Returns why the run stops, if it must."""
        c = self.config.checkpoint
        if not (step % c.every_steps == 0 or (step == self.last_step and c.at_end) or note is not None):
            return None
        if not self.health.healthy:
            if self.rank == 0:
                print(f"checkpoint step {step} not written: steps are being skipped", flush=True)
            return None
        self.watchdog.arm(self.t.startup_timeout_s)
        wait = step == self.last_step or note is not None
        saved = self.checkpoints.save(self.engine, step, self._trainer_state(step), wait=wait, note=note)
        while wait and not saved.complete and self._failed_saves_stop() is None:
            saved = self.checkpoints.save(self.engine, step, self._trainer_state(step), wait=True, note=note)
        self.watchdog.arm(self.t.hang_timeout_s)
        self.monitor.checkpoint_saved(saved.blocked, self.checkpoints.pending is not None)
        self.last_metrics["checkpoint_seconds"] = saved.blocked
        if self.rank == 0 and self.checkpoints.pending is saved:
            print(f"checkpoint step {step} staged in {saved.blocked:.2f}s; uploading to {self.checkpoints.url} in the "
                  f"background", flush=True)
        return self._failed_saves_stop() if wait and not saved.complete else None

    def _trainer_state(self, step: int) -> dict:
        b = self.batches
        state = {"step": step, "epoch": b.epoch, "batch_in_epoch": b.batch_in_epoch, "rng": _rng_state(),
                 "phases": [list(astuple(p)) for p in b.phases], "data_group": self.group}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def _finish(self, step: int) -> dict:
        """The save in flight marked, the final evaluation, the run's figures written and reported."""
        waited = time.monotonic()
        self.watchdog.arm(self.t.startup_timeout_s)  # an upload may outlast a step's timeout
        self.checkpoints.wait()  # a periodic save still in flight (checkpoint.at_end off) gets its marker
        final = {**self.last_metrics, "step": step, "checkpoint_blocked_seconds": self.checkpoints.blocked_seconds,
                 "checkpoint_saves": self.checkpoints.saves, "checkpoint_failed_saves": self.checkpoints.failed_saves,
                 "checkpoint_final_wait_seconds": time.monotonic() - waited}
        if self.validation is not None and step == self.t.total_steps:
            self.watchdog.arm(self.t.startup_timeout_s)
            result = evaluate_with_ema(self.engine, self.validation, self.health.device, self.ema)
            self.monitor.evaluated(result)
            final.update({f"val_{k}": v for k, v in result.items() if k != "samples"})
            if self.rank == 0:
                print(f"final eval: {describe(result)}", flush=True)
        if self.rank == 0:
            _write_metrics(self.config, step, final, self.history)
        if self.report is not None:
            self.report(final)
        self.monitor.close()  # after monitoring.linger_seconds, so the final values get scraped
        return final


def _write_metrics(config: Config, step: int, final: dict, history: list[dict]) -> None:
    """This job's logged steps and final figures, for the driver and for people; a job that
    had nothing left to do keeps the file of the one that did the work."""
    fs, path = url_to_fs(run_url(config), storage_options(config.storage))
    metrics_file = f"{path}/metrics-step{step:09d}.json"
    if history or not fs.exists(metrics_file):
        if "://" not in config.storage.url:  # no checkpoint may have made the run's folder
            fs.makedirs(path, exist_ok=True)
        fs.pipe_file(metrics_file, json.dumps({"final": final, "history": history}, indent=1).encode())


def _checkpoint_complete(saved, url: str, rank: int, health: Health, monitor, notices: Notices) -> None:
    """A checkpoint's marker is written: rollbacks now go to it; its step and age are monitored;
    a reclaim notice's deadline is judged against its time, staging and upload (a save that
    waited blocked for both; a background one, for its staging and commit only)."""
    health.saved(saved.step, saved.tag)
    monitor.checkpoint_complete(saved.step, saved.upload_seconds)
    notices.last_save_s = saved.blocked + (saved.upload_seconds if saved.thread is not None else 0.0)
    if rank == 0:
        print(f"checkpoint step {saved.step} saved to {url}: the loop blocked {saved.blocked:.2f}s, rank 0 stored its "
              f"files in {saved.upload_seconds:.2f}s" + (f" ({', '.join(saved.note)})" if saved.note else ""), flush=True)


def _interruption(signalled: int, notice: dict | None) -> dict | None:
    """What the marker of a checkpoint saved for a drain records, or None: {"signal": NAME} when
    a stop signal reached any rank (this step's all-reduce says so), or {"preemption": notice}
    on a new reclaim notice."""
    if signalled:
        name = signal_received() or "SIGTERM/SIGUSR1"  # a rank that caught none names what others caught
        return {"signal": name}
    if notice is not None:
        return {"preemption": notice}
    return None


def _describe_drain(note: dict, signalled: int, notices: Notices) -> str:
    if "signal" in note:
        return f"signal: {note['signal']} reached {signalled} rank(s)"
    return notices.situation(note["preemption"])


def train_worker(loop_config: dict) -> None:
    """What Ray Train runs on each worker. `loop_config["config"]` is a validated Config."""
    import ray
    import ray.train

    context = ray.train.get_context()
    runtime = ray.get_runtime_context()
    placement = Placement(context.get_world_rank(), context.get_world_size(), context.get_local_rank(),
                          node=runtime.get_node_id(), job=ray_job_key())
    train(loop_config["config"], placement, report=ray.train.report, preemption_info=ray.train.get_preemption_info)


def ray_job_key() -> str:
    """Names this Ray job: the worker groups of one job (its restarts) share it; a rerun of the
    command is another job."""
    import ray

    runtime = ray.get_runtime_context()
    return f"{runtime.get_session_name()}-job{runtime.get_job_id()}"
