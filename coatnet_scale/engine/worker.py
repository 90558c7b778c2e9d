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
import socket
import time
import warnings
from dataclasses import astuple, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from coatnet_scale.batch import apply_batch_plan, batch_plan
from coatnet_scale.config import Config, TrainConfig
from coatnet_scale.data import eval_loader, train_loader
from coatnet_scale.data.plan import Phase, derive_seed
from coatnet_scale.engine import collectives
from coatnet_scale.engine.checkpoint import Checkpoints
from coatnet_scale.engine.compiled import compile_blocks
from coatnet_scale.engine.ema import ShardedEMA
from coatnet_scale.engine.failures import FailureLog
from coatnet_scale.engine.faults import Faults
from coatnet_scale.engine.health import Health, Rollback, read_rollbacks
from coatnet_scale.engine.interrupt import EXIT_RESUMABLE, Notices, signal_received
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
        compiled = compile_blocks(model, use_gpu)
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
    """`model.checkpointing` as configured or, for auto, the planner's choice for this device's
    memory (cluster.gpu_memory for CPU workers) at this group's size and micro-batch; rank 0
    logs it with the predicted activation peak."""
    if use_gpu:
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    else:
        memory = (config.cluster.gpu_memory or 0) * GiB
    choice = checkpointing_policy(config, dist.get_world_size(), memory, "cuda" if use_gpu else "cpu", 2 if bf16 else 4)
    if dist.get_rank() == 0:
        print(describe_choice(choice, MODEL_SPECS[config.model.name]), flush=True)
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


def forward_backward(engine, images: torch.Tensor, targets: torch.Tensor, loss_kind: str,
                     poison: bool = False) -> torch.Tensor:
    """One micro-batch, on the device (`StreamingLoader.to_device`), through the engine (forward,
    backward, and the optimizer step at the end of an accumulation); returns the loss, detached.
    `poison`: a NaN loss (fault injection, engine/faults.py)."""
    logits = engine(images)
    loss = soft_target_loss(logits, targets, loss_kind)
    if poison:
        loss = loss * float("nan")
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
               ema: ShardedEMA | None, step: int, poison: bool = False) -> StepCounts:
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
                                     poison)
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
    rank, world_size = placement.rank, placement.world_size
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
    checkpoints = Checkpoints(checkpoint_url(config), options, config.checkpoint.keep, rank, world_size,
                              metadata=checkpoint_metadata(config), local_rank=placement.local_rank,
                              async_upload=config.checkpoint.async_upload)
    tag, marker = checkpoints.choose()
    finished = finished_report(config, marker)
    if finished is not None:  # e.g. Ray restarting a group after the last step: nothing to redo
        if rank == 0:
            print(f"run {config.run_name} already finished at step {finished['step']} ({checkpoints.url}/{tag}): "
                  f"nothing to do", flush=True)
        if report is not None:
            report(finished)
        return finished
    nodes = [placement.node]  # every rank's node, by rank
    if world_size > 1:
        nodes = [None] * world_size
        dist.all_gather_object(nodes, placement.node)
    failures = FailureLog(run_url(config), options, placement.job) if placement.job else None
    attempt, stop = failures.start(tag, rank, nodes) if failures else (None, None)
    if stop is not None:
        if rank == 0:
            print(f"stopping: {stop}", flush=True)
        final = {"stopped": stop}
        if report is not None:
            report(final)
        return final
    progress = {"step": 0}  # where a failure happened, for its record
    try:
        problems = placement_problems(config, nodes)  # what only the placed workers can see
        if problems:
            raise RuntimeError("; ".join(problems))
        faults = Faults(run_url(config), options, rank)
        checkpoints.faults = faults
        monitors: list = []  # one for every attempt: a rollback is not a new worker group
        while True:
            try:
                final = _train(config, placement, device, checkpoints, tag, marker, report, progress, watchdog, nodes,
                               faults, monitors, notices)
                break
            except Rollback:
                checkpoints.discard()  # the rollback record names the newest marked checkpoint
            gc.collect()  # the attempt's engine and loaders (the exception held them), before the next is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
            watchdog.arm(config.train.startup_timeout_s)
            tag, marker = checkpoints.choose()
        if "stopped" in final and failures is not None and rank == 0:
            failures.stop(final["stopped"])  # what the Ray driver reads
        return final
    except Exception as error:
        if failures is not None:
            failures.record(attempt, rank, progress["step"], error)
        raise


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
    rank, world_size = placement.rank, placement.world_size
    c = config.cluster
    plan = batch_plan(config.train, world_size, c.num_workers, c.min_workers or c.num_workers)
    t = config.train
    if (plan.micro_batch_size, plan.grad_accum_steps, plan.global_batch_size) != (
            t.micro_batch_size, t.grad_accum_steps, t.global_batch_size):  # an elastic group, or a resize
        configured = t.global_batch_size
        config = apply_batch_plan(config, plan)
        checkpoints.metadata = checkpoint_metadata(config)
        if rank == 0:
            print(f"elastic: {plan.describe(configured)}", flush=True)
    resized = marker is not None and marker["world_size"] != world_size
    engine, scheduler = build_engine(config, config.cluster.use_gpu,
                                     initial_weights=tag is None and bool(config.finetune.init_checkpoint),
                                     load_universal=resized)
    try:
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in engine.module.parameters())
        full = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        if rank == 0:
            print(f"ZeRO-{config.deepspeed.zero_stage}: rank 0 holds {local:,} of {full:,} parameters ({local / full:.1%})", flush=True)
        step, epoch, batch_in_epoch, state = 0, 0, 0, {}
        if tag is not None:
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
        else:
            torch.manual_seed(config.train.seed * 1000 + rank + 1)  # stochastic depth differs per rank
        progress["step"] = step

        # The EMA starts from the weights training starts from: initial, loaded, or resumed.
        ema = ShardedEMA(engine.module, config.train.ema_decay, engine.optimizer) if config.train.ema_decay else None
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        t = config.train
        last_step = min(t.total_steps, t.stop_at_step or t.total_steps)
        loader = train_loader(config, rank, world_size)
        validation = eval_loader(config, rank, world_size) if config.data.val_manifest else None
        # The data group: who reads this epoch's samples. A group of another shape continues the
        # epoch with the samples the earlier groups (phases) left, each still read once.
        group = [world_size, config.data.num_workers, t.micro_batch_size]
        phases = tuple(Phase(*p) for p in state.get("phases", ()))
        if "data_group" in state and state["data_group"] != group:
            phases, batch_in_epoch = (*phases, Phase(*state["data_group"], batch_in_epoch)), 0
            left = loader.samples_left(epoch, phases)
            if left < world_size * max(1, config.data.num_workers):  # too few to give every slot one: next epoch
                if rank == 0 and left:
                    print(f"data: the last {left} samples of epoch {epoch} are left out: fewer than this group's "
                          f"{world_size * max(1, config.data.num_workers)} loader slots", flush=True)
                epoch, phases = epoch + 1, ()
        if batch_in_epoch >= loader.batches_in(epoch, phases):  # checkpointed at an epoch's end: skip reading it
            epoch, batch_in_epoch, phases = epoch + 1, 0, ()
        records = [read_rollbacks(run_url(config), storage_options(config.storage)) if rank == 0 else None]
        if world_size > 1:
            dist.broadcast_object_list(records, src=0)
        health = Health(config, run_url(config), storage_options(config.storage), rank, world_size, nodes, device, tag, step,
                        records[0])
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
        return _loop(config, placement, engine, scheduler, checkpoints, batches, validation, ema, monitor, health,
                     watchdog, faults, group, step, report, progress, notices)
    finally:
        release_engine(engine)


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


def _loop(config: Config, placement: Placement, engine, scheduler, checkpoints: Checkpoints, batches: EpochBatches,
          validation, ema, monitor, health: Health, watchdog: Watchdog, faults: Faults, group: list, step: int,
          report, progress: dict, notices: Notices) -> dict:
    rank, world_size = placement.rank, placement.world_size
    t = config.train
    device = health.device
    last_step = min(t.total_steps, t.stop_at_step or t.total_steps)
    last_metrics: dict = {}
    history: list[dict] = []
    window_start, window_steps, window_wait, window_images, corrupt = time.monotonic(), 0, 0.0, 0, 0
    checkpoints.on_complete = lambda saved: _checkpoint_complete(saved, checkpoints.url, rank, health, monitor,
                                                                  notices)
    while step < last_step:
        faults.hang(step + 1)
        started = time.monotonic()
        counts = train_step(engine, scheduler, batches, device, t, monitor, ema, step + 1, faults.nan(step + 1))
        faults.delay(step + 1)
        compute = time.monotonic() - started - counts.data_wait
        step += 1
        progress["step"] = step
        # Every rank learns how the step went on all of them (one small all-reduce), and the
        # log line's sums come with it.
        agreed = health.agree(step, counts.loss, engine.get_global_grad_norm(), engine.was_step_applied(),
                              counts.corrupt, counts.images, compute, checkpoints.uploaded(),
                              signal_received() is not None)
        if "stopped" in agreed:
            checkpoints.discard()
            if rank == 0:
                print(f"stopping: {agreed['stopped']}", flush=True)
            final = {**last_metrics, "step": step, "stopped": agreed["stopped"]}
            if report is not None:
                report(final)
            monitor.close()
            return final
        if agreed["uploaded"] == world_size:  # every rank stored its part of the save in flight
            checkpoints.commit()
        watchdog.arm(t.hang_timeout_s)
        window_steps += 1
        window_wait += counts.data_wait
        window_images += agreed["images"]
        corrupt += agreed["corrupt"]
        if step % t.log_every == 0 or step == last_step:
            elapsed = time.monotonic() - window_start
            last_metrics = {
                "step": step, "epoch": batches.epoch, "loss": agreed["loss"], "lr": scheduler.get_last_lr()[0],
                "images_per_second": window_images / elapsed,
                "step_seconds": elapsed / window_steps, "data_wait_fraction": window_wait / elapsed,
                "corrupt_samples": corrupt,
            }
            if device.type == "cuda":  # what the planner predicts (python -m coatnet_scale.plan)
                last_metrics["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
            history.append(last_metrics)
            monitor.log()
            if rank == 0:
                print(
                    f"step {step}/{t.total_steps} loss {last_metrics['loss']:.4f} lr {last_metrics['lr']:.2e} "
                    f"{last_metrics['images_per_second']:.1f} img/s step {last_metrics['step_seconds']:.3f}s "
                    f"data-wait {last_metrics['data_wait_fraction']:.0%}",
                    flush=True,
                )
            window_start, window_steps, window_wait, window_images = time.monotonic(), 0, 0.0, 0
        if validation is not None and t.eval_every and step % t.eval_every == 0 and step < last_step:
            watchdog.arm(t.startup_timeout_s)
            result = evaluate_with_ema(engine, validation, device, ema)
            monitor.evaluated(result)
            watchdog.arm(t.hang_timeout_s)
            if rank == 0:
                print(f"eval step {step}: {describe(result)}", flush=True)
        # A reclaim notice (Ray) or a stop signal (without Ray): save now (docs/elastic.md, "Preemption").
        interrupted = _interruption(agreed["signalled"], notices.new(step), notices, step, rank)
        if interrupted is not None and "preemption" in interrupted:
            monitor.preempted()
        due = (step % config.checkpoint.every_steps == 0 or (step == last_step and config.checkpoint.at_end)
               or interrupted is not None)
        if due and not health.healthy:
            if rank == 0:
                print(f"checkpoint step {step} not written: steps are being skipped", flush=True)
        elif due:
            watchdog.arm(t.startup_timeout_s)
            trainer_state = {"step": step, "epoch": batches.epoch, "batch_in_epoch": batches.batch_in_epoch,
                             "rng": _rng_state(), "phases": [list(astuple(p)) for p in batches.phases],
                             "data_group": group}
            if ema is not None:
                trainer_state["ema"] = ema.state_dict()
            # The run's last save, and one on a notice or a signal, wait for their marker; others
            # upload in the background (when on).
            saved = checkpoints.save(engine, step, trainer_state, wait=step == last_step or interrupted is not None,
                                     note=interrupted)
            watchdog.arm(t.hang_timeout_s)
            monitor.checkpoint_saved(saved.blocked, checkpoints.pending is not None)
            last_metrics["checkpoint_seconds"] = saved.blocked
            if rank == 0 and not saved.complete:
                print(f"checkpoint step {step} staged in {saved.blocked:.2f}s; uploading to {checkpoints.url} in the "
                      f"background", flush=True)
        if interrupted is not None and "signal" in interrupted:
            monitor.linger_seconds = 0  # the signal's sender waits for this process to end
            last_metrics["interrupted"] = interrupted["signal"]
            break
    waited = time.monotonic()
    watchdog.arm(t.startup_timeout_s)  # an upload may outlast a step's timeout
    checkpoints.wait()  # a periodic save still in flight (checkpoint.at_end off) gets its marker
    final = {**last_metrics, "step": step, "checkpoint_blocked_seconds": checkpoints.blocked_seconds,
             "checkpoint_saves": checkpoints.saves, "checkpoint_final_wait_seconds": time.monotonic() - waited}
    if validation is not None and step == t.total_steps:
        watchdog.arm(t.startup_timeout_s)
        result = evaluate_with_ema(engine, validation, device, ema)
        monitor.evaluated(result)
        final.update({f"val_{k}": v for k, v in result.items() if k != "samples"})
        if rank == 0:
            print(f"final eval: {describe(result)}", flush=True)
    fs, path = url_to_fs(run_url(config), storage_options(config.storage))
    metrics_file = f"{path}/metrics-step{step:09d}.json"
    # This job's logged steps and final figures, for the driver and for people; a job that had
    # nothing left to do keeps the file of the one that did the work.
    if rank == 0 and (history or not fs.exists(metrics_file)):
        if "://" not in config.storage.url:  # no checkpoint may have made the run's folder
            fs.makedirs(path, exist_ok=True)
        fs.pipe_file(metrics_file, json.dumps({"final": final, "history": history}, indent=1).encode())
    if report is not None:
        report(final)
    monitor.close()  # after monitoring.linger_seconds, so the final values get scraped
    return final


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


def _interruption(signalled: int, notice: dict | None, notices: Notices, step: int, rank: int) -> dict | None:
    """What the marker of a checkpoint saved now records, or None: {"signal": NAME} when a stop
    signal reached any rank (this step's all-reduce says so), {"preemption": notice} on a new
    reclaim notice. Rank 0 logs it."""
    if signalled:
        name = signal_received() or "SIGTERM/SIGUSR1"  # a rank that caught none names what others caught
        if rank == 0:
            print(f"signal: {name} reached {signalled} rank(s): saving a checkpoint at step {step} and exiting "
                  f"(code {EXIT_RESUMABLE}); the same command resumes", flush=True)
        return {"signal": name}
    if notice is not None:
        if rank == 0:
            print(notices.describe(notice, step), flush=True)
        return {"preemption": notice}
    return None


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
