"""Typed run configuration: YAML files in configs/ plus `--set key=value` overrides.

Every entry point loads its config here, and nothing starts before it validates. Errors name
the source, the full dotted key and what was expected:

    configs/tiny.yaml: train.lr_warmup: unknown key; did you mean train.warmup_steps?
    --set train.lr=fast: train.lr: Input should be a valid number; got 'fast'

Secrets (SecretStr fields) print and save as '**********'; use `dump_config` for both.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, StrictBool, ValidationError, field_validator, model_validator

from coatnet_scale.batch import ElasticBatchError, apply_batch_plan, batch_plan
from coatnet_scale.storage import DEMO_DIR


class ConfigError(ValueError):
    """A config that failed validation; the message lists every problem, one per line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CheckpointingConfig(Section):
    every: int = Field(0, ge=0, description="0: none, 1: every block, k: every k-th block of a stage")
    stages: list[Literal[1, 2, 3, 4]] = [1, 2, 3, 4]


class ModelConfig(Section):
    # Checked against the registry where models are built (models.unknown_model, the launchers'
    # preflight): config sits below models (docs/layout.md).
    name: str = "coatnet_pico"
    image_size: int = Field(32, ge=32, multiple_of=32)
    num_classes: int = Field(10, ge=1)
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    checkpointing: CheckpointingConfig | Literal["auto"] = Field(
        CheckpointingConfig(), description="which blocks recompute their activations in backward; auto: the fewest that "
                                           "fit the device's memory at train.micro_batch_size (docs/planning.md)")
    channels_last: bool = Field(False, description="the stem and MBConv stages in channels-last memory format")
    compile: Literal["none", "blocks"] = Field("none", description="blocks: torch.compile (inductor) each MBConv and "
                                                                   "Transformer block, a ZeRO-3 leaf (docs/engine.md)")
    attention_backend: Literal["auto", "efficient", "cudnn", "flash", "math"] = Field(
        "auto", description="the scaled_dot_product_attention kernel; auto: the fastest known to give the position bias "
                            "its gradient on this device (docs/models.md, Attention kernels)")

    @field_validator("attention_backend")
    @classmethod
    def _takes_the_bias(cls, backend: str) -> str:
        if backend == "flash":  # a value users will try: say why it cannot serve, not just "not one of"
            raise ValueError("no flash kernel takes an additive mask that needs its gradient (the relative-position "
                             "bias); use auto, efficient, cudnn or math")
        return backend


class DataConfig(Section):
    train_manifest: str = f"{DEMO_DIR}/train/manifest.json"  # `python -m dataprep demo` builds it
    val_manifest: str | None = f"{DEMO_DIR}/val/manifest.json"
    num_workers: int = Field(2, ge=0, description="DataLoader workers per rank")
    mode: Literal["exact", "resampled"] = "exact"
    epoch_samples: int | None = Field(None, ge=1, description="resampled mode: samples per epoch, all ranks")
    shuffle_buffer: int = Field(1000, ge=1)
    corrupt_limit: float = Field(0.001, ge=0.0, le=1.0, description="fail above this fraction of bad samples")
    # Augmentation defaults suit the demo digits (no flips, mild crops); configs/coatnet*.yaml
    # set the paper's recipe.
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = False
    randaugment_ops: int = Field(0, ge=0, description="0 disables RandAugment")
    randaugment_magnitude: int = Field(9, ge=0, le=30, description="RandAugment's own scale, as the paper's recipe: 10 is "
                                       "torchvision's strongest setting, 15 half as far again (docs/data.md)")
    mixup_alpha: float = Field(0.0, ge=0.0, description="0 disables Mixup")
    cutmix_alpha: float = Field(0.0, ge=0.0, description="0 disables CutMix")
    eval_crop_ratio: float = Field(0.875, gt=0.0, le=1.0)


class TrainConfig(Section):
    seed: int = 0
    global_batch_size: int = Field(64, ge=1)
    micro_batch_size: int = Field(32, ge=1, description="per worker, per forward pass")
    total_steps: int = Field(150, ge=1)
    warmup_steps: int = Field(15, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    lr: float = Field(1e-3, gt=0.0)
    min_lr: float = Field(1e-5, ge=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0, description="0 disables clipping")
    loss: Literal["softmax", "sigmoid"] = "softmax"
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    grad_accum_steps: int = Field(1, ge=1, description="global batch = micro batch x this x workers")
    log_every: int = Field(10, ge=1, description="rank 0 prints a line every this many steps")
    eval_every: int = Field(0, ge=0, description="evaluate every this many steps (0: only at the end)")
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0, description="EMA of the weights per optimizer step; 0 disables")
    stop_at_step: int | None = Field(
        None, ge=1, description="end this job after this step, with a checkpoint; rerun to continue (time-boxed jobs)"
    )
    # 7%: with micro-batches from the configured one down to half of it, every group size from
    # half the configured workers to all of them finds a batch (coatnet_scale/batch.py; checked
    # for the shipped configs in tests/test_elastic.py), so a reclaimed node never stops a run.
    elastic_batch_tolerance: float = Field(
        0.07, ge=0.0, lt=1.0, description="at a worker count that cannot make global_batch_size exactly, use the nearest "
                                          "attainable batch within this fraction of it (lr scaled alike); 0: refuse")
    elastic_min_micro_batch: int | None = Field(
        None, ge=1, description="the smallest micro-batch an elastic group may run (default: half micro_batch_size); "
                                "smaller means more accumulation steps, each a full ZeRO-3 parameter gather")
    # Run health (docs/engine.md, Run health).
    hang_timeout_s: float = Field(600.0, gt=0, description="a step that takes longer makes every rank that is still "
                                                           "running dump its stacks to diagnostics/ and exit, so the group restarts")
    startup_timeout_s: float = Field(3600.0, gt=0, description="the same for the first step after a start or resume "
                                                               "(model build, resume, conversion), evaluation and checkpoints")
    max_skipped_steps: int = Field(3, ge=1, description="roll back after this many consecutive steps DeepSpeed skipped "
                                                        "(non-finite gradient norm)")
    spike_sigma: float = Field(6.0, ge=0.0, description="roll back on a loss above the rolling mean + this many standard "
                                                        "deviations; 0 disables")
    spike_window: int = Field(128, ge=64, description="steps in the rolling loss statistics (at least 64 are needed)")
    spike_skip_batches: int = Field(0, ge=0, description="after a rollback, also skip this many steps' batches after the "
                                                         "trouble step")
    max_rollbacks: int = Field(3, ge=0, description="rollbacks to one checkpoint before the run stops (exit 78)")
    override_stop: bool = Field(False, description="start a run whose record says it stopped on purpose (STOPPED.json; "
                                                   "docs/elastic.md, Exit codes): pass once, with --set, after fixing the cause")


class ClusterConfig(Section):
    """The Ray worker group: one worker per GPU, or per CPU process in smoke runs."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    memory_per_worker_gb: float | None = Field(None, gt=0)
    gpu_memory: float | None = Field(None, gt=0, description="GiB per device for model.checkpointing=auto where the worker "
                                                             "cannot ask the device (CPU workers); GPUs use their own size")
    max_failures: int = Field(3, ge=-1, description="worker-group restarts before the job fails; -1: unlimited")
    min_workers: int | None = Field(None, ge=1, description="elastic: Ray restarts a group that lost nodes with as few "
                                                            "as this many workers (and grows it back); default num_workers: fixed")
    # Ray reports no autoscaling maximum, so the config states it: launch/cluster-aws.yaml's 32
    # p5.48xlarge nodes are {GPU: 256, CPU: 6144}, launch/kuberay-rayjob.yaml's 32 pods {GPU: 256, CPU: 5760}.
    max_resources: dict[str, float] | None = Field(
        None, description="the most of each Ray resource the cluster can grow to (its autoscaling maximum); "
                          "unset: the cluster is as large as it will get")
    scale_up_timeout_s: float = Field(1800.0, gt=0, description="how long preflight waits for an autoscaling cluster to hold the group")
    max_preemptions: int = Field(-1, ge=-1, description="restarts after a node was reclaimed (Ray's FailureConfig."
                                                        "max_preemption_failures, apart from max_failures); -1: unlimited")
    preemption_grace_s: float = Field(0.0, ge=0, description="how long Ray keeps the surviving workers running past a "
                                                             "reclaim's deadline before it restarts the group")


class DeepSpeedConfig(Section):
    """ZeRO-3 settings passed through to DeepSpeed (see deepspeed.ai/docs/config-json)."""

    zero_stage: Literal[0, 1, 2, 3] = 3
    bf16: bool | None = Field(None, description="default: on with GPUs, off on CPU")
    overlap_comm: bool = True
    reduce_bucket_size: int = Field(50_000_000, ge=1)
    stage3_prefetch_bucket_size: int = Field(50_000_000, ge=1)
    stage3_param_persistence_threshold: int = Field(100_000, ge=0)
    stage3_max_live_parameters: int = Field(1_000_000_000, ge=1)
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_param: Literal["none", "cpu"] = "none"
    stage3_max_reuse_distance: int = Field(1_000_000_000, ge=0, description="keep a gathered parameter if it is used again within this many parameter elements")
    zero_hpz_partition_size: int = Field(1, ge=1, description="ZeRO++ hpZ: a secondary copy of the parameters per this many "
                                                              "consecutive ranks (one node), so backward gathers stay inside it; 1: off")


class CheckpointConfig(Section):
    every_steps: int = Field(500, ge=1)
    keep: int = Field(3, ge=1, description="newest complete checkpoints kept")
    at_end: bool = Field(True, description="save when the job ends (off only for throughput benchmarks)")
    async_upload: StrictBool | None = Field(
        None, description="hash and upload in the background, the loop waiting only for local staging "
                          "(docs/checkpoints.md); default: true for object stores (s3://, gs://), false for local paths")
    preemption_poll_steps: int = Field(10, ge=1, description="under Ray, ask for a reclaim notice every this many steps "
                                                             "(a barrier); on one every rank saves at once")
    max_failed_saves: int = Field(3, ge=1, description="a save a rank cannot store is dropped on every rank and the next "
                                                       "tries again; this many in a row stop the run (exit 78)")


class FinetuneConfig(Section):
    """Where a run's weights start: a checkpoint of an earlier run (pretraining) or an export.
    Set by `python -m coatnet_scale.finetune --init URL`; a run that has checkpoints of its own
    resumes from those instead."""

    init_checkpoint: str | None = Field(None, description="checkpoint URL (step folder, checkpoints or run folder) or .safetensors export")
    init_weights: Literal["raw", "ema"] = Field("raw", description="which weights of a checkpoint to start from")
    new_classifier: bool | None = Field(None, description="fresh classifier; default: when the class count differs")


class StorageConfig(Section):
    """Where checkpoints go: a local path or any fsspec URL (s3://bucket/prefix, gs://...).

    Prefer the standard AWS environment or a profile for credentials; keys given here are
    accepted but never printed or saved."""

    url: str = "runs"
    shared: bool = Field(False, description="a local path in url is one filesystem mounted on every node (NFS, Lustre, "
                                            "EFS); without it a local path is refused when workers span nodes")
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    retries: int = Field(5, ge=1, description="attempts of one S3 request that meets throttling (503 SlowDown), another "
                                              "5xx or a dropped connection, with exponential backoff (docs/checkpoints.md)")


class WandbConfig(Section):
    """A Weights & Biases run per run_name; credentials come from W&B's own login or WANDB_API_KEY."""

    project: str
    mode: Literal["online", "offline"] = "online"
    entity: str | None = None
    dir: str | None = Field(None, description="W&B's local folder (default: $WANDB_DIR, else ./wandb on rank 0's node)")

    @field_validator("dir")
    @classmethod
    def _absolute(cls, folder: str | None) -> str | None:
        if folder is not None and not Path(folder).is_absolute():
            raise ValueError("must be an absolute path (Ray workers run in another directory)")
        return folder


def _installed(package: str, extra: str) -> None:
    from monitoring.tracking import SinkMissing, require

    try:
        require(package, extra)
    except SinkMissing as e:
        raise ValueError(str(e)) from None


class MonitoringConfig(Section):
    """Prometheus metrics: every training worker serves /metrics; rank 0 also writes TensorBoard
    and W&B when asked (docs/monitoring.md)."""

    enabled: bool = True
    address: str = Field("127.0.0.1", description="interface the exporters bind; node: each node's Ray address (workers on "
                                                  "several nodes); 0.0.0.0 only when Prometheus scrapes from another host")
    port: int = Field(0, ge=0, le=65535, description="0: each worker takes a free port; N: the worker of local rank r takes N + r")
    targets_dir: str | None = Field(None, description="Prometheus file_sd folder, one {run_name}.json per run; default {storage.url}/prometheus")
    peak_tflops: float | None = Field(None, gt=0, description="one device's peak TFLOP/s at the training precision, for MFU; unset: no MFU")
    linger_seconds: float = Field(0.0, ge=0, description="keep serving /metrics this long after training, so the final values get scraped")
    straggler_every_steps: int = Field(100, ge=1, description="rank 0 compares the ranks' compute time every this many steps")
    straggler_ratio: float = Field(1.2, gt=1.0, description="log a rank whose compute time is this many times the median")
    tensorboard: str | None = Field(None, description="folder or URL for TensorBoard event files, one sub-folder per run_name")
    wandb: WandbConfig | None = Field(None, description="{project, mode: online|offline, entity, dir}: a W&B run per run_name")

    @field_validator("tensorboard")
    @classmethod
    def _tensorboard_installed(cls, folder: str | None) -> str | None:
        if folder is not None:
            _installed("tensorboard", "tensorboard")
            if "://" not in folder and not Path(folder).is_absolute():
                raise ValueError("must be an absolute path or a URL (Ray workers run in another directory)")
        return folder

    @field_validator("wandb")
    @classmethod
    def _wandb_installed(cls, wandb: WandbConfig | None) -> WandbConfig | None:
        if wandb is not None:
            _installed("wandb", "wandb")
        return wandb

    @field_validator("targets_dir")
    @classmethod
    def _absolute(cls, folder: str | None) -> str | None:
        if folder is not None and "://" not in folder and not Path(folder).is_absolute():
            raise ValueError("must be an absolute path or a URL (Ray workers run in another directory)")
        return folder


class Config(Section):
    """Defaults are the embedded quick-start run: coatnet_pico on the demo corpus, 2 CPU workers."""

    run_name: str = "demo"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    cluster: ClusterConfig = ClusterConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    storage: StorageConfig = StorageConfig()
    monitoring: MonitoringConfig = MonitoringConfig()

    @model_validator(mode="after")
    def _batch_adds_up(self) -> "Config":
        """micro x accumulation x workers is the global batch, or the worker count is one the
        global batch can be made with (coatnet_scale/batch.py: what changing only num_workers,
        or an elastic group, runs)."""
        t, c = self.train, self.cluster
        if t.micro_batch_size * t.grad_accum_steps * c.num_workers != t.global_batch_size:
            try:
                batch_plan(t, c.num_workers, max(c.num_workers, 1024), c.min_workers or 1)
            except ElasticBatchError as e:
                raise ValueError(
                    f"train.global_batch_size={t.global_batch_size} is not train.micro_batch_size="
                    f"{t.micro_batch_size} x train.grad_accum_steps={t.grad_accum_steps} x cluster.num_workers="
                    f"{c.num_workers} (= {t.micro_batch_size * t.grad_accum_steps * c.num_workers}), and {e}") from None
        return self

    @model_validator(mode="after")
    def _auto_checkpointing_has_a_budget(self) -> "Config":
        if self.model.checkpointing == "auto" and not self.cluster.use_gpu and self.cluster.gpu_memory is None:
            raise ValueError("model.checkpointing=auto on CPU workers needs cluster.gpu_memory (GiB per worker to plan for)")
        return self

    @model_validator(mode="after")
    def _attention_kernel_on_this_device(self) -> "Config":
        if self.model.attention_backend in ("efficient", "cudnn") and not self.cluster.use_gpu:
            raise ValueError(f"model.attention_backend={self.model.attention_backend} is a CUDA kernel and "
                             f"cluster.use_gpu=false; use auto or math on CPU workers")
        return self

    @model_validator(mode="after")
    def _elastic_range(self) -> "Config":
        c = self.cluster
        if c.min_workers is not None and c.min_workers > c.num_workers:
            raise ValueError(f"cluster.min_workers={c.min_workers} must not exceed cluster.num_workers={c.num_workers}")
        return self

    @model_validator(mode="after")
    def _startup_after_hang(self) -> "Config":
        t = self.train
        if t.startup_timeout_s < t.hang_timeout_s:
            raise ValueError(f"train.startup_timeout_s={t.startup_timeout_s:g} must not be below "
                             f"train.hang_timeout_s={t.hang_timeout_s:g} (the first step does more than a step)")
        return self

    @model_validator(mode="after")
    def _hpz_groups_fit(self) -> "Config":
        hpz, workers = self.deepspeed.zero_hpz_partition_size, self.cluster.num_workers
        if hpz > 1 and self.deepspeed.zero_stage != 3:
            raise ValueError(f"deepspeed.zero_hpz_partition_size={hpz} needs deepspeed.zero_stage=3")
        if workers % hpz:
            raise ValueError(f"deepspeed.zero_hpz_partition_size={hpz} must divide cluster.num_workers={workers} "
                             f"(each hpZ group is {hpz} consecutive ranks on one node)")
        return self


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _valid_keys(field.annotation, f"{prefix}{name}.")
    return keys


def _secret_keys(model: type[BaseModel] = None, prefix: str = "") -> set[str]:
    """Dotted paths of the fields that hold secrets (SecretStr)."""
    keys = set()
    for name, field in (model or Config).model_fields.items():
        if "SecretStr" in str(field.annotation):
            keys.add(prefix + name)
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys |= _secret_keys(field.annotation, f"{prefix}{name}.")
    return keys


def _describe(error: dict, source: str) -> str:
    path = ".".join(str(part) for part in error["loc"])
    if not path:  # a check across sections
        return f"{source}: {error['msg'].removeprefix('Value error, ')}"
    if error["type"] == "extra_forbidden":
        parent = path.rpartition(".")[0]
        siblings = [k for k in _valid_keys(Config) if k.rpartition(".")[0] == parent]
        close = difflib.get_close_matches(path, siblings, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else f"; valid keys here: {', '.join(siblings)}"
        return f"{source}: {path}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{source}: {path}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if path in _secret_keys():
        return f"{source}: {path}: {message}"  # never echo a secret
    return f"{source}: {path}: {message}; got {error['input']!r}"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = tree.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part} is a value, not a section")
        tree = child
    tree[leaf] = value


def shipped_configs() -> list[Path]:
    """The folders of shipped configs: the installed package's (package data), else the
    checkout's configs/ when running from one (an editable install)."""
    here = Path(__file__).resolve().parent
    folders = [here / "configs"]
    if (here.parent / "pyproject.toml").exists():
        folders.append(here.parent / "configs")
    return [folder for folder in folders if folder.is_dir()]


def resolve_config(path: str | Path) -> Path:
    """The config file `path` names: the path itself when it exists (an explicit path wins),
    else a shipped config of that name, so `--config coatnet6.yaml`, `--config coatnet6` and
    `--config configs/coatnet6.yaml` work from any working directory."""
    given = Path(path)
    if given.exists() or given.parent not in (Path("."), Path("configs")):
        return given
    name = given.name if given.suffix in (".yaml", ".yml") else f"{given.name}.yaml"
    for folder in shipped_configs():
        if (folder / name).is_file():
            return folder / name
    return given


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or start from defaults), apply KEY=VALUE overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = resolve_config(path)
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            shipped = sorted({f.stem for folder in shipped_configs() for f in folder.glob("*.yaml")})
            raise ConfigError(f"{path}: config file not found; shipped configs: {', '.join(shipped) or 'none'}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    # Each key is checked where it comes from; checks across sections (batch arithmetic) run
    # once every override is in, and name the file and the overrides together.
    _validate(raw, source, keys_only=bool(overrides))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=5e-4")
        if key.strip() in _secret_keys():
            # Command lines are visible to every user of the machine (ps, job entrypoints).
            raise ConfigError(f"--set {key.strip()}: secrets are not taken on the command line; use the "
                              f"standard AWS environment variables or a profile (storage.profile)")
        _set_dotted(raw, key.strip(), yaml.safe_load(text) if text else "")
        _validate(raw, f"--set {item}", keys_only=True)
    if overrides:
        _validate(raw, f"{source} with --set {' '.join(overrides)}", keys_only=False)
    return Config.model_validate(raw)


def _validate(raw: dict, source: str, keys_only: bool) -> None:
    try:
        Config.model_validate(raw)
    except ValidationError as e:
        errors = [err for err in e.errors() if err["loc"] or not keys_only]
        if errors:
            raise ConfigError("\n".join(_describe(err, source) for err in errors)) from None


def dump_config(config: Config) -> str:
    """The resolved config as YAML, secrets redacted: the only way configs get printed or saved."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (configs/*.yaml); defaults when omitted")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one key, e.g. --set train.lr=5e-4 (repeatable)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def as_run(config: Config) -> Config:
    """The config as a group of cluster.num_workers runs it: the micro-batch and accumulation
    the workers derive from the global batch (coatnet_scale/batch.py), so --print-config shows
    the batch plan, not the configured ceiling."""
    c = config.cluster
    plan = batch_plan(config.train, c.num_workers, c.num_workers, c.min_workers or c.num_workers)
    return apply_batch_plan(config, plan)


def config_from_arguments(args: argparse.Namespace) -> Config:
    """Load the config named by `add_config_arguments`' flags; exit 2 with the message if invalid,
    exit 0 after printing it for --print-config."""
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error:\n{e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(dump_config(as_run(config)), end="")
        raise SystemExit(0)
    return config
