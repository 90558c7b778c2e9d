"""`python -m coatnet_scale.pretrain --config FILE [--set key=value ...]`: pretrain on Ray.

Under `ray job submit` (RAY_ADDRESS set) it runs on that cluster; with no cluster it starts a
local Ray instance, so the same command works on a laptop and on 128 nodes. Everything that
can be checked before Ray starts work is checked first, each failure one line and exit 2:
the config, the data manifests, the storage URL, whether the cluster can ever hold the worker
group (an autoscaling cluster, with cluster.max_resources, is waited for), and whether a local
storage path would have to serve several nodes. With no arguments it pretrains the embedded
default: coatnet_pico on the demo corpus (`python -m dataprep demo` builds it in
~/.cache/coatnet_scale/demo, where every process on the host finds it; `make demo` does both),
2 CPU workers under ZeRO-3, local storage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid

from coatnet_scale.batch import describe_sizes
from coatnet_scale.config import Config, add_config_arguments, config_from_arguments
from coatnet_scale.storage import DEMO_DIR, storage_options, url_to_fs


class PreflightError(RuntimeError):
    pass


class JobStopped(RuntimeError):
    """The run stopped on purpose (run health, an error that repeated with no progress); it
    stays stopped (engine/failures.py)."""


def check_inputs(config: Config) -> None:
    """Data manifests readable and storage writable, before any worker starts."""
    from coatnet_scale.data import load_manifest
    from coatnet_scale.models import unknown_model

    if unknown_model(config.model.name):
        raise PreflightError(f"model.name: {unknown_model(config.model.name)}")
    warn_elastic_sizes(config)
    options = storage_options(config.storage)
    demo_manifest = f"{DEMO_DIR}/train/manifest.json"
    if absolute(config.data.train_manifest) == demo_manifest and not os.path.exists(demo_manifest):
        # The sharder sits above the trainer (docs/layout.md): it builds the corpus, not us.
        raise PreflightError(f"data.train_manifest: the demo corpus is not built yet; build it with "
                             f"`python -m dataprep demo` (into {DEMO_DIR}; what `make demo` does first)")
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


def worker_resources(config: Config) -> dict:
    """The Ray resources of one training worker."""
    c = config.cluster
    resources = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = c.gpus_per_worker
    if c.memory_per_worker_gb:
        resources["memory"] = c.memory_per_worker_gb * 2**30
    return resources


def workers_that_fit(nodes: list[dict], worker: dict) -> int:
    """How many workers of `worker`'s resources these nodes' resources hold, each on one node."""
    asked = {kind: amount for kind, amount in worker.items() if amount}
    return sum(min(int(node.get(kind, 0) // amount) for kind, amount in asked.items()) for node in nodes) if asked else 10**9


def check_capacity(config: Config, nodes: list[dict], autoscaling: bool) -> None:
    """Fail when the cluster can never hold the worker group (an elastic one at its smallest):
    its nodes now, or for an autoscaling cluster, the maximum the config states
    (cluster.max_resources)."""
    c, worker = config.cluster, worker_resources(config)
    needed = fewest_workers(config)
    have = {kind: sum(node.get(kind, 0) for node in nodes) for kind in worker}
    limit = {kind: c.max_resources[kind] for kind in worker if kind in c.max_resources} if autoscaling else have
    for kind, amount in worker.items():
        if kind in limit and amount * needed > limit[kind]:
            where = "the cluster can grow to (cluster.max_resources)" if autoscaling else "the Ray cluster has"
            raise PreflightError(f"cluster: {needed} workers need {amount * needed:g} {kind} in all, "
                                 f"{where} {limit[kind]:g}")
    if not autoscaling and workers_that_fit(nodes, worker) < needed:
        raise PreflightError(f"cluster: its nodes hold {workers_that_fit(nodes, worker)} of the {needed} workers "
                             f"({', '.join(f'{v:g} {k}' for k, v in worker.items())} each, on one node)")


def wait_for_capacity(config: Config, autoscaling: bool, poll_s: float = 2.0) -> list[dict]:
    """Return the alive nodes' resources once they can hold the worker group (an elastic one at
    min_workers: Ray Train starts it there and grows it as nodes arrive).

    A cluster that cannot grow (our own local instance, or no cluster.max_resources) is judged
    as it is. An autoscaling one is refused at once only when its maximum cannot hold the
    group; otherwise it is asked for the group's resources and waited for, with a line whenever
    it grows (and every 30 s), until cluster.scale_up_timeout_s."""
    import ray
    from ray.autoscaler.sdk import request_resources

    c, worker = config.cluster, worker_resources(config)
    needed = fewest_workers(config)

    def alive() -> list[dict]:
        return [node["Resources"] for node in ray.nodes() if node["Alive"]]

    nodes = alive()
    check_capacity(config, nodes, autoscaling)
    if not autoscaling or workers_that_fit(nodes, worker) >= needed:
        return nodes
    # Ray Train's own request would come only with its placement group; asking now starts the
    # nodes while the rest of preflight waits. The request is withdrawn once answered.
    request_resources(bundles=[worker] * c.num_workers)
    # An elastic group starts at min_workers and Ray Train grows it as nodes arrive.
    group = f"{needed} workers" if needed == c.num_workers else f"{needed} workers (min_workers; up to {c.num_workers})"
    start = last_line = time.monotonic()
    held = None
    try:
        while (fit := workers_that_fit(nodes, worker)) < needed:
            waited = time.monotonic() - start
            if waited >= c.scale_up_timeout_s:
                raise PreflightError(f"cluster: after {waited:.0f} s its nodes hold {fit} of the {group} "
                                     f"(cluster.scale_up_timeout_s {c.scale_up_timeout_s:g}); is the autoscaler running "
                                     f"and cluster.max_resources right?")
            if fit != held or time.monotonic() - last_line >= 30:
                print(f"cluster: waiting for the autoscaler: its {len(nodes)} node(s) hold {fit} of the {group}; "
                      f"{waited:.0f} s of {c.scale_up_timeout_s:g} s", flush=True)
                held, last_line = fit, time.monotonic()
            time.sleep(poll_s)
            nodes = alive()
    finally:
        request_resources(bundles=[])
    holding = f"the {needed} workers" if needed == c.num_workers else (
        f"{min(fit, c.num_workers)} of up to {c.num_workers} workers (Ray Train asks for the rest and grows the group)")
    print(f"cluster: {len(nodes)} node(s) hold {holding} after {time.monotonic() - start:.0f} s", flush=True)
    return nodes


def check_storage_reach(config: Config, nodes: list[dict], autoscaling: bool) -> None:
    """A local storage path serves one node: refuse it when the group may span nodes (no node
    holds it all, or the cluster grows by nodes), unless storage.shared says every node mounts it."""
    from coatnet_scale.engine.placement import is_local

    c = config.cluster
    if not is_local(config.storage.url) or config.storage.shared:
        return
    one_node = max((workers_that_fit([node], worker_resources(config)) for node in nodes), default=0)
    if autoscaling or one_node < c.num_workers:
        raise PreflightError(
            f"storage.url: {config.storage.url} is a local path and the {c.num_workers} workers may run on several "
            f"nodes; each would write its own disk. Use object storage (s3://...), or a filesystem every node mounts "
            f"at that path and say so with storage.shared: true")


def elastic(config: Config) -> bool:
    c = config.cluster
    return c.min_workers is not None and c.min_workers < c.num_workers


def warn_elastic_sizes(config: Config) -> None:
    """An elastic group may run at any size from min_workers to num_workers: print the batch
    each size runs, and warn of sizes that cannot make the global batch."""
    if not elastic(config):
        return
    c = config.cluster
    lines = describe_sizes(config.train, c.min_workers, c.num_workers)
    print("cluster: an elastic group runs, by size: " + "; ".join(lines), flush=True)
    bad = [line.partition(" workers")[0] for line in lines if line.endswith("cannot make the batch")]
    if bad:
        print(f"cluster: warning: an elastic group of {', '.join(bad)} workers cannot make train.global_batch_size="
              f"{config.train.global_batch_size} (train.elastic_batch_tolerance {config.train.elastic_batch_tolerance:g}); "
              f"a group that shrinks to such a size stops with that message", file=sys.stderr, flush=True)


def fewest_workers(config: Config) -> int:
    """The smallest group the job runs with: min_workers when elastic (Ray grows it later)."""
    return config.cluster.min_workers if elastic(config) else config.cluster.num_workers


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


def connect_and_wait(config: Config) -> list[dict]:
    """Connect to Ray, then wait until the cluster holds the worker group and check that its
    storage reaches every node it may use; returns the alive nodes' resources."""
    # Before Ray is imported: keep a local instance's node address on loopback (without this,
    # Ray swaps 127.0.0.1 for the machine's address; on a cluster the nodes' own addresses
    # stand, and this would make a driver look for its node on loopback), and print worker
    # lines once, not twice.
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray

    # DeepSpeed reads DS_ACCELERATOR once, at import, in each worker: it must come with the job.
    env = {"DS_ACCELERATOR": "cuda" if config.cluster.use_gpu else "cpu"}
    env.update(worker_env(config))
    private = False  # a local instance of our own never grows
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # under `ray job submit`, or pointed at a cluster
            ray.init(runtime_env={"env_vars": env})
        else:  # the embedded default: a private local instance, never another one found on the machine
            ray.init(address="local", runtime_env={"env_vars": env}, _node_ip_address="127.0.0.1",
                     include_dashboard=True, dashboard_host="127.0.0.1")
            private = True
    autoscaling = not private and config.cluster.max_resources is not None
    nodes = wait_for_capacity(config, autoscaling)
    check_storage_reach(config, nodes, autoscaling)
    return nodes


def worker_env(config: Config) -> dict:
    """What the workers' environment needs for run health: on GPUs the NCCL flight recorder,
    dumping beside the stacks; a test's injected fault (engine/faults.py), when set here."""
    from coatnet_scale.engine.faults import VARIABLE
    from coatnet_scale.engine.watchdog import gpu_worker_env
    from coatnet_scale.engine.worker import run_url

    env = {VARIABLE: os.environ[VARIABLE]} if os.environ.get(VARIABLE) else {}
    if config.cluster.use_gpu:
        env.update({k: os.environ.get(k, v) for k, v in gpu_worker_env(run_url(config)).items()})
    return env


def report_diagnostics(config: Config, since: float) -> None:
    """Name the stack dumps that ranks which stopped making progress wrote during this job."""
    from coatnet_scale.engine.worker import run_url

    fs, path = url_to_fs(f"{run_url(config)}/diagnostics", storage_options(config.storage))
    dumps = [p for p in fs.find(path) if fs.size(p) and fs.modified(p).timestamp() >= since] if fs.exists(path) else []
    if dumps:
        print(f"diagnostics: {len(dumps)} stack dump(s) of ranks whose step hung, in {run_url(config)}/diagnostics/",
              flush=True)


def run(config: Config) -> dict:
    connect_and_wait(config)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from coatnet_scale.engine.watchdog import collective_timeout_s
    from coatnet_scale.engine.worker import train_worker

    c = config.cluster
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config},
        # Elastic (min_workers < num_workers): Ray restarts a group that lost nodes at the size
        # that fits and grows it back; the worker reshards the checkpoint (docs/elastic.md).
        scaling_config=ScalingConfig(num_workers=(c.min_workers, c.num_workers) if elastic(config) else c.num_workers,
                                     use_gpu=c.use_gpu, resources_per_worker=worker_resources(config)),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=f"{config.storage.url.rstrip('/')}/ray",
            # A reclaimed node (docs/elastic.md, "Preemption") counts apart from failures.
            failure_config=FailureConfig(max_failures=c.max_failures, max_preemption_failures=c.max_preemptions,
                                         preemption_grace_s=c.preemption_grace_s),
        ),
        # Longer than the step watchdog, so a rank stuck in a collective dumps its stacks first.
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo",
                                 timeout_s=int(collective_timeout_s(config.train.hang_timeout_s))),
    )
    started = time.time()
    try:
        trainer.fit()
    finally:
        report_diagnostics(config, started)
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

            outcome = standalone.run(config, check_inputs)
            if "stopped" in outcome:
                raise JobStopped(outcome["stopped"])
            if "interrupted" in outcome:
                from coatnet_scale.engine.interrupt import EXIT_RESUMABLE

                if int(os.environ.get("RANK", "0")) == 0:
                    print(f"{command}: {config.run_name} stopped on {outcome['interrupted']} at step {outcome['step']}; the "
                          f"same command resumes from its newest complete checkpoint (exit code {EXIT_RESUMABLE})",
                          file=sys.stderr)
                return EXIT_RESUMABLE
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
        from coatnet_scale.engine.failures import OVERRIDE
        from coatnet_scale.engine.interrupt import EXIT_STOPPED

        if OVERRIDE not in str(e):
            e = f"{e}; it stays stopped: a rerun refuses to start until run once with --set {OVERRIDE}=true"
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{command}: {config.run_name} stopped: {e} (exit code {EXIT_STOPPED})", file=sys.stderr)
        return EXIT_STOPPED
    final = metrics.get("final", {})
    summary = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in final.items())
    print(f"{command}: {config.run_name} finished: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
