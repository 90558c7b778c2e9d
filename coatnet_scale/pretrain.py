"""`python -m coatnet_scale.pretrain --config FILE [--set key=value ...]`: pretrain on Ray.

Under `ray job submit` (RAY_ADDRESS set) it runs on that cluster; with no cluster it starts a
local Ray instance, so the same command works on a laptop and on 128 nodes. Everything that
can be checked before Ray starts work is checked first, each failure one line and exit 2:
the config, the data manifests, the storage URL, and whether the cluster can ever hold the
worker group. With no arguments it pretrains the embedded default: coatnet_pico on the demo
corpus (built on first use), 2 CPU workers under ZeRO-3, local storage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid

from coatnet_scale.config import Config, add_config_arguments, config_from_arguments
from coatnet_scale.storage import storage_options, url_to_fs

DEMO_DIR = "data/demo"


class PreflightError(RuntimeError):
    pass


class JobStopped(RuntimeError):
    """The worker group stopped retrying an error that repeated with no progress."""


def check_inputs(config: Config) -> None:
    """Data manifests readable and storage writable, before any worker starts."""
    from coatnet_scale.data import load_manifest

    options = storage_options(config.storage)
    demo_manifest = absolute(f"{DEMO_DIR}/train/manifest.json")
    if config.data.train_manifest == demo_manifest and not os.path.exists(demo_manifest):
        from coatnet_scale.data.demo import build_demo_corpus

        build_demo_corpus(absolute(DEMO_DIR))
    for key in ("train_manifest", "val_manifest"):
        url = getattr(config.data, key)
        if url is None:
            continue
        try:
            manifest = load_manifest(url, options)
        except Exception as e:
            raise PreflightError(f"data.{key}: cannot read {url}: {e}") from None
        if len(manifest.classes) != config.model.num_classes:
            raise PreflightError(
                f"data.{key}: {url} has {len(manifest.classes)} classes but model.num_classes is {config.model.num_classes}"
            )
    check_initial_weights(config, options)
    try:  # write and remove a probe: the only proof that checkpoints can be written there
        fs, path = url_to_fs(config.storage.url, options)
        if "://" not in config.storage.url:
            fs.makedirs(path, exist_ok=True)  # on object stores a prefix needs no creating
        probe = f"{path.rstrip('/')}/.preflight-{uuid.uuid4().hex}"
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except Exception as e:
        raise PreflightError(f"storage.url: cannot use {config.storage.url}: {type(e).__name__}: {e}") from None


def check_initial_weights(config: Config, options: dict) -> None:
    """finetune.init_checkpoint names a complete checkpoint or an export of the configured model,
    with an EMA when init_weights is ema. A run with checkpoints of its own resumes from them and
    never reads it, but it must be the one that run started from."""
    from coatnet_scale.engine.checkpoint import Checkpoints
    from coatnet_scale.engine.worker import checkpoint_url

    url, f = config.finetune.init_checkpoint, config.finetune
    own = Checkpoints(checkpoint_url(config), options, keep=1, rank=0, world_size=1)
    latest = own.latest()
    if latest is not None:
        started_from = own._marker(latest).get("init_checkpoint")
        if url is not None and started_from is not None and started_from != url:
            raise PreflightError(f"finetune.init_checkpoint: run {config.run_name} started from {started_from}, "
                                 f"not {url}; give this fine-tune another run_name")
        return
    if url is None:
        return
    from coatnet_scale.engine.pretrained import describe_weights, require_model

    try:
        require_model(config, *describe_weights(url, f.init_weights, options))
    except Exception as e:
        raise PreflightError(f"finetune.init_checkpoint: {e}") from None


def check_capacity(config: Config, resources: dict) -> None:
    c = config.cluster
    need = {"CPU": c.num_workers * c.cpus_per_worker}
    if c.use_gpu:
        need["GPU"] = c.num_workers * c.gpus_per_worker
    for kind, amount in need.items():
        have = resources.get(kind, 0)
        if amount > have:
            raise PreflightError(
                f"cluster: {c.num_workers} workers need {amount:g} {kind} in all, the Ray cluster has {have:g}"
            )


def absolute(url: str | None) -> str | None:
    """Local paths made absolute: Ray workers run in another working directory."""
    return url if url is None or "://" in url else os.path.abspath(url)


def with_absolute_paths(config: Config) -> Config:
    data = config.data.model_copy(update={
        "train_manifest": absolute(config.data.train_manifest), "val_manifest": absolute(config.data.val_manifest),
    })
    storage = config.storage.model_copy(update={"url": absolute(config.storage.url)})
    finetune = config.finetune.model_copy(update={"init_checkpoint": absolute(config.finetune.init_checkpoint)})
    return config.model_copy(update={"data": data, "storage": storage, "finetune": finetune})


def run(config: Config) -> dict:
    # Before Ray is imported: keep a local instance's node address on loopback (without this,
    # Ray swaps 127.0.0.1 for the machine's address), and print worker lines once, not twice.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from coatnet_scale.engine.worker import train_worker

    c = config.cluster
    # DeepSpeed reads DS_ACCELERATOR once, at import, in each worker: it must come with the job.
    env = {"DS_ACCELERATOR": "cuda" if c.use_gpu else "cpu"}
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # under `ray job submit`, or pointed at a cluster
            ray.init(runtime_env={"env_vars": env})
        else:  # the embedded default: a private local instance, never another one found on the machine
            ray.init(address="local", runtime_env={"env_vars": env}, _node_ip_address="127.0.0.1",
                     include_dashboard=True, dashboard_host="127.0.0.1")
    check_capacity(config, ray.cluster_resources())
    resources = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = c.gpus_per_worker
    if c.memory_per_worker_gb:
        resources["memory"] = c.memory_per_worker_gb * 2**30
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config},
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=f"{config.storage.url.rstrip('/')}/ray",
            failure_config=FailureConfig(max_failures=c.max_failures),
        ),
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
    )
    trainer.fit()
    from coatnet_scale.engine.failures import FailureLog
    from coatnet_scale.engine.worker import ray_job_key, run_url

    stopped = FailureLog(run_url(config), storage_options(config.storage), ray_job_key()).stopped()
    if stopped:
        raise JobStopped(stopped)
    return read_metrics(config)


def read_metrics(config: Config) -> dict:
    """The job's final figures, as rank 0 wrote them (metrics-step*.json of the last step)."""
    from coatnet_scale.engine.worker import run_url

    fs, path = url_to_fs(run_url(config), storage_options(config.storage))
    files = sorted(fs.glob(f"{path}/metrics-step*.json"))
    return json.loads(fs.cat_file(files[-1])) if files else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coatnet_scale.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    add_launcher_arguments(parser)
    args = parser.parse_args(argv)
    return launch(config_from_arguments(args), "pretrain", args.without_ray)


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--without-ray", action="store_true",
                        help="run the training loop in this process, or in each process torchrun starts "
                             "(for hosts without Ray; no restarts, no elastic groups)")


def launch(config: Config, command: str, without_ray: bool = False) -> int:
    """Preflight, train on Ray (or without), print the final figures: the body of `pretrain`
    and `finetune`."""
    config = with_absolute_paths(config)
    try:
        if without_ray:
            from coatnet_scale import standalone

            try:
                standalone.run(config, check_inputs)
            except ValueError as e:  # the group does not match the config
                raise PreflightError(str(e)) from None
            if int(os.environ.get("RANK", "0")) != 0:
                return 0
            metrics = read_metrics(config)
        else:
            check_inputs(config)
            metrics = run(config)
    except PreflightError as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 2
    except JobStopped as e:
        print(f"{command}: {config.run_name} stopped: {e}", file=sys.stderr)
        return 1
    final = metrics.get("final", {})
    summary = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in final.items())
    print(f"{command}: {config.run_name} finished: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
