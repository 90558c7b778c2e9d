"""Multi-node truth on one machine: a Ray cluster of two raylets on loopback (the
`two_node_cluster` fixture: 127.0.0.2 and 127.0.0.3, 2 CPUs each) trains with ZeRO++ hpZ
across both nodes and resumes, lists each node's exporters under that node's address, and
refuses node-local storage (preflight, and the workers themselves); an autoscaling cluster
(Ray's fake-provider autoscaler) gets a waiting preflight; the headline command finds the
shipped config from any directory, and the wheel ships the configs; `dataprep --ray` never
waits on a cluster that is not there."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, RayCluster, _free_port, ray_client_environment

TINY = REPO / "configs" / "tiny.yaml"


def data_overrides(corpus: Path) -> list[str]:
    return [f"data.train_manifest={corpus}/train/manifest.json", f"data.val_manifest={corpus}/val/manifest.json"]


def run_job(cluster, entrypoint: str, timeout: float = 300) -> tuple[str, str]:
    """Submit to the cluster's job API, wait for the end; (status, logs)."""
    for _ in range(30):  # the head's job agent comes up a few seconds after the dashboard
        try:
            job = cluster.client.submit_job(entrypoint=entrypoint, entrypoint_num_cpus=0)
            break
        except Exception as e:
            if "No available agent" not in str(e):
                raise
            time.sleep(2)
    deadline = time.monotonic() + timeout
    while not cluster.client.get_job_status(job).is_terminal():
        assert time.monotonic() < deadline, cluster.client.get_job_logs(job)[-3000:]
        time.sleep(1)
    return str(cluster.client.get_job_status(job)), cluster.client.get_job_logs(job)


def pretrain_entrypoint(*overrides: str) -> str:
    return shlex.join([sys.executable, "-m", "coatnet_scale.pretrain", "--config", str(TINY),
                       *(f"--set={o}" for o in overrides)])


# -- two nodes ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_hpz_trains_across_two_nodes_and_resumes(two_node_cluster, s3_endpoint, s3_bucket, demo_corpus, tmp_path):
    """4 workers, 2 per node, hpZ groups of 2 (one per node), checkpoints on S3: launch/submit.py
    (its client turning token mode on by itself) runs 2 steps and stops, the same command
    resumes and finishes 4. While the first runs, the Prometheus list names each worker under
    its own node's address, each listed exporter answers as the rank it is listed as, and a
    real Prometheus run by `python -m monitoring.cluster` (the head's, which copies the lists
    from storage) scrapes all four, on both nodes."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    runs = f"s3://{s3_bucket}/runs"
    common = [f"storage.url={runs}", "run_name=hpz", *data_overrides(demo_corpus), "cluster.num_workers=4",
              "train.micro_batch_size=8", "train.global_batch_size=32", "train.total_steps=4", "train.warmup_steps=1",
              "train.log_every=1", "checkpoint.every_steps=2", "deepspeed.zero_hpz_partition_size=2",
              "data.num_workers=0", "cluster.max_failures=0", "monitoring.address=node"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # the token alone, as after `make demo`

    def submit(*overrides: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(REPO / "launch" / "submit.py"), "--address", two_node_cluster.dashboard, "--",
             "pretrain", "--config", str(TINY), *(f"--set={o}" for o in [*common, *overrides])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
        )

    # Prometheus on the "head", started the documented way (docs/cluster.md, Monitoring).
    prometheus_port = _free_port()
    monitor = subprocess.Popen(
        [sys.executable, "-m", "monitoring.cluster", "--targets", f"{runs}/prometheus", "--dir", str(tmp_path / "mon"),
         "--no-grafana", "--prometheus-port", str(prometheus_port), "--scrape-interval", "1s", "--sync-every", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    first = submit("train.stop_at_step=2", "monitoring.linger_seconds=10")
    targets_file, listed, answered, scraped = f"{s3_bucket}/runs/prometheus/hpz.json", None, {}, set()
    deadline = time.monotonic() + 400
    try:
        while first.poll() is None and time.monotonic() < deadline and not (answered and len(scraped) == 4):
            if not answered and fs.exists(targets_file):
                listed = json.loads(fs.cat_file(targets_file))
                for group in listed:  # scrape each listed exporter: which rank answers there?
                    target = group["targets"][0]
                    text = urllib.request.urlopen(f"http://{target}/metrics", timeout=5).read().decode()
                    answered[target] = re.search(r'coatnet_steps_total\{.*rank="(\d+)"', text)[1]
            try:  # which workers has Prometheus scraped successfully?
                query = f"http://127.0.0.1:{prometheus_port}/api/v1/query?query=up%7Bjob%3D%22coatnet_scale%22%7D%3D%3D1"
                result = json.loads(urllib.request.urlopen(query, timeout=5).read())["data"]["result"]
                scraped = {r["metric"]["instance"] for r in result}
            except OSError:
                pass  # Prometheus still starting
            time.sleep(0.5)
        output = first.communicate(timeout=400)[0]
    finally:
        monitor.terminate()
        monitor_output = monitor.communicate(timeout=60)[0]
    assert first.returncode == 0, output[-4000:]
    assert f"monitoring: Prometheus on 127.0.0.1:{prometheus_port}" in monitor_output, monitor_output[-2000:]
    assert monitor.returncode == 0, monitor_output[-2000:]
    assert len(scraped) == 4 and scraped == set(answered), (scraped, answered)  # both nodes' workers, every one
    assert "submit: job" in output and "SUCCEEDED" in output

    # Each node's two workers under that node's loopback address; each target serves its rank.
    assert listed is not None, output[-3000:]
    hosts = sorted(group["targets"][0].rpartition(":")[0] for group in listed)
    assert hosts == ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"]
    assert answered == {group["targets"][0]: group["labels"]["rank"] for group in listed}
    assert "workers are on 2 nodes but publish loopback addresses (127.0.0.2, 127.0.0.3)" in output
    assert re.search(r"ZeRO-3: rank 0 holds [\d,]+ of [\d,]+ parameters \(25", output)  # 4-way primary partition

    second = submit()  # once: submit() has started it
    output = second.communicate(timeout=400)[0]
    assert second.returncode == 0, output[-4000:]
    assert f"resumed from {runs}/hpz/checkpoints/step_000000002: step 2" in output
    marker = json.loads(fs.cat_file(f"{s3_bucket}/runs/hpz/checkpoints/step_000000004/COMPLETE.json"))
    assert marker["world_size"] == 4
    assert {f"trainer_state_rank{r}.pt" for r in range(4)} <= set(marker["files"])  # every node's files, in one place
    metrics = json.loads(fs.cat_file(f"{s3_bucket}/runs/hpz/metrics-step000000004.json"))
    assert [h["step"] for h in metrics["history"]] == [3, 4] and all(h["loss"] > 0 for h in metrics["history"])


@pytest.mark.slow
def test_node_local_storage_and_a_cluster_too_small(two_node_cluster, demo_corpus, tmp_path):
    """Preflight on the two-node cluster, one line and exit 2 each: a local storage path when 4
    workers need both nodes; a group larger than the stated maximum, at once; a group the
    maximum holds but the cluster never grows to, after the timeout and a progress line."""
    base = [f"storage.url={tmp_path}", *data_overrides(demo_corpus), "cluster.num_workers=4",
            "train.micro_batch_size=8", "train.global_batch_size=32"]
    status, logs = run_job(two_node_cluster, pretrain_entrypoint(*base))
    assert status == "FAILED"
    assert (f"pretrain: storage.url: {tmp_path} is a local path and the 4 workers may run on several nodes; "
            "each would write its own disk") in logs, logs[-3000:]

    six = [*base[:-3], "cluster.num_workers=6", "train.micro_batch_size=8", "train.global_batch_size=48"]
    start = time.monotonic()
    status, logs = run_job(two_node_cluster, pretrain_entrypoint(*six, "cluster.max_resources={CPU: 5}"))
    assert status == "FAILED" and time.monotonic() - start < 60
    assert "pretrain: cluster: 6 workers need 6 CPU in all, the cluster can grow to (cluster.max_resources) 5" in logs

    status, logs = run_job(two_node_cluster, pretrain_entrypoint(*six, "cluster.max_resources={CPU: 8}",
                                                                 "cluster.scale_up_timeout_s=4"))
    assert status == "FAILED"
    assert "cluster: waiting for the autoscaler: its 2 node(s) hold 4 of the 6 workers" in logs, logs[-3000:]
    assert re.search(r"pretrain: cluster: after \d+ s its nodes hold 4 of the 6 workers \(cluster.scale_up_timeout_s 4\)",
                     logs), logs[-3000:]
    assert "Traceback" not in logs


WORKER_CHECK = """
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from coatnet_scale.config import load_config
from coatnet_scale.engine.worker import train_worker

config = load_config({tiny!r}, ["storage.url={storage}", "cluster.num_workers=4", "train.global_batch_size=128",
                                "monitoring.enabled=false"])
ray.init(runtime_env={{"env_vars": {{"DS_ACCELERATOR": "cpu"}}}})
TorchTrainer(train_worker, train_loop_config={{"config": config}}, scaling_config=ScalingConfig(num_workers=4),
             run_config=RunConfig(storage_path="{runs}")).fit()
"""


@pytest.mark.slow
def test_workers_refuse_node_local_storage(two_node_cluster, s3_bucket, tmp_path):
    """What preflight cannot see, the workers check where they landed: the training loop Ray
    runs (here without pretrain's preflight), 4 workers on two nodes with a local storage path,
    stops before training, naming the key."""
    script = tmp_path / "check.py"
    script.write_text(WORKER_CHECK.format(tiny=str(TINY), storage=tmp_path / "runs", runs=f"s3://{s3_bucket}/ray"))
    status, logs = run_job(two_node_cluster, f"{sys.executable} {script}")
    assert status == "FAILED"
    assert f"storage.url: {tmp_path / 'runs'} is a local path and the 4 workers are on 2 nodes" in logs, logs[-3000:]


def test_placement_and_storage_rules():
    """The rules themselves, on made-up placements: hpZ groups must not straddle nodes; local
    storage on several nodes only when declared shared."""
    from coatnet_scale.config import load_config
    from coatnet_scale.engine.placement import placement_problems
    from coatnet_scale.pretrain import PreflightError, check_storage_reach

    hpz = load_config(TINY, ["cluster.num_workers=4", "train.global_batch_size=128", "deepspeed.zero_hpz_partition_size=2",
                             "storage.url=s3://bucket/runs"])
    assert placement_problems(hpz, ["a", "a", "b", "b"]) == []
    assert "ranks 2..3 span nodes (workers per node: 3, 1)" in placement_problems(hpz, ["a", "a", "a", "b"])[0]
    local = load_config(TINY, ["cluster.num_workers=4", "train.global_batch_size=128", "storage.url=/data/runs"])
    two_nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    assert "is a local path" in placement_problems(local, ["a", "a", "b", "b"])[0]
    with pytest.raises(PreflightError, match="storage.url: /data/runs is a local path"):
        check_storage_reach(local, two_nodes, autoscaling=False)
    check_storage_reach(local, [{"CPU": 4.0}, {"CPU": 2.0}], autoscaling=False)  # one node holds them all
    shared = local.model_copy(update={"storage": local.storage.model_copy(update={"shared": True})})
    assert placement_problems(shared, ["a", "a", "b", "b"]) == []
    check_storage_reach(shared, two_nodes, autoscaling=True)


# -- an autoscaling cluster ------------------------------------------------------------------------


def fake_autoscaling_config(gcs_address: str, max_workers: int) -> dict:
    """Ray's fake multi-node provider (what ray.cluster_utils.AutoscalingCluster starts, less
    its `ray stop --force`, which would stop every Ray on the machine): 0-CPU head, nodes of 2
    CPUs launched as raylets on this machine when resources are requested."""
    return {
        "cluster_name": "fake", "max_workers": max_workers, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu2": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": max_workers},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


PREFLIGHT = """
from coatnet_scale.config import load_config
from coatnet_scale.pretrain import connect_and_wait
config = load_config({tiny!r}, ["train.global_batch_size=128", "storage.url=s3://bucket/runs",
                                "cluster.max_resources={{CPU: 4}}", "cluster.scale_up_timeout_s=90", *{overrides!r}])
nodes = connect_and_wait(config)
print("PREFLIGHT PASSED", len(nodes), "nodes", sum(n.get("CPU", 0) for n in nodes), "CPUs")
"""


@pytest.mark.slow
@pytest.mark.parametrize("group", ["fixed", "elastic"])
def test_preflight_waits_for_an_autoscaling_cluster(group, tmp_path):
    """A cluster started with no worker capacity whose stated maximum holds the group: preflight
    asks the autoscaler, reports while nodes arrive, and passes once they hold the group.

    Elastic: the autoscaler can launch only one 2-CPU node (spot capacity, say) while the stated
    maximum holds all 4 workers; preflight passes once min_workers=2 fit, for Ray Train to start
    the group there, rather than waiting out its timeout for the 4."""
    fixed = group == "fixed"
    overrides = ["cluster.num_workers=4"] if fixed else ["cluster.num_workers=4", "cluster.min_workers=2"]
    port = _free_port()
    config = tmp_path / "autoscaling.json"
    config.write_text(json.dumps(fake_autoscaling_config(f"127.0.0.1:{port}", max_workers=2 if fixed else 1)))
    with ray_client_environment(), pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_FAKE_CLUSTER", "1")
        env.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")
        cluster = RayCluster(dict(os.environ), num_cpus=0, head_args=("--autoscaling-config", str(config)), port=port)
        try:
            script = tmp_path / "preflight.py"
            script.write_text(PREFLIGHT.format(tiny=str(TINY), overrides=overrides))
            status, logs = run_job(cluster, f"{sys.executable} {script}", timeout=180)
        finally:
            cluster.stop()
    assert status == "SUCCEEDED", logs[-3000:]
    if fixed:
        assert "cluster: waiting for the autoscaler: its 1 node(s) hold 0 of the 4 workers" in logs
        assert re.search(r"cluster: 3 node\(s\) hold the 4 workers after \d+ s", logs), logs[-3000:]
        assert "PREFLIGHT PASSED 3 nodes 4.0 CPUs" in logs
    else:
        assert "cluster: waiting for the autoscaler: its 1 node(s) hold 0 of the 2 workers (min_workers; up to 4)" in logs
        assert re.search(r"cluster: 2 node\(s\) hold 2 of up to 4 workers \(Ray Train asks for the rest", logs), logs[-3000:]
        assert "PREFLIGHT PASSED 2 nodes 2.0 CPUs" in logs


PREFLIGHT_SHIPPED = """
import sys
from coatnet_scale.config import load_config
from coatnet_scale.pretrain import PreflightError, connect_and_wait
for path in sys.argv[1:]:
    config = load_config(path, ["storage.url=s3://bucket/runs", "cluster.scale_up_timeout_s=1"])
    try:
        connect_and_wait(config)
        print(path, "PASSED")
    except PreflightError as e:
        print(path, "STOPPED:", e, flush=True)
"""


@pytest.mark.slow
def test_shipped_gpu_configs_wait_for_the_aws_cluster(tmp_path):
    """Every shipped GPU config's preflight, on a cluster whose autoscaler (Ray's fake provider)
    has launch/cluster-aws.yaml's node types and maxima and, like it, starts with a 0-CPU head
    only: each asks the autoscaler and waits (cut short here by cluster.scale_up_timeout_s=1),
    none is refused at once. The autoscaler's update interval outlasts the test, so none of
    the 8-GPU nodes it would launch starts on this machine."""
    import yaml
    from test_launch import AWS, GPU_CONFIGS, P5

    aws = yaml.safe_load(AWS.read_text())["available_node_types"]
    port = _free_port()
    fake = fake_autoscaling_config(f"127.0.0.1:{port}", max_workers=aws["gpu"]["max_workers"] + aws["cpu"]["max_workers"])
    fake["available_node_types"] = {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "gpu": {"resources": P5, "node_config": {}, "min_workers": 0, "max_workers": aws["gpu"]["max_workers"]},
        "cpu": {"resources": {"CPU": 64}, "node_config": {}, "min_workers": 0, "max_workers": aws["cpu"]["max_workers"]},
    }
    config = tmp_path / "autoscaling.json"
    config.write_text(json.dumps(fake))
    script = tmp_path / "preflight.py"
    script.write_text(PREFLIGHT_SHIPPED)
    with ray_client_environment(), pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_FAKE_CLUSTER", "1")
        env.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "600")
        cluster = RayCluster(dict(os.environ), num_cpus=0, head_args=("--autoscaling-config", str(config)), port=port)
        try:
            status, logs = run_job(cluster, shlex.join([sys.executable, str(script), *map(str, GPU_CONFIGS)]), timeout=240)
        finally:
            cluster.stop()
    assert status == "SUCCEEDED", logs[-3000:]
    from coatnet_scale.config import load_config

    for path in GPU_CONFIGS:
        workers = load_config(path).cluster.num_workers
        lines = [line for line in logs.splitlines() if line.startswith(f"{path} ")]
        assert len(lines) == 1 and "STOPPED: cluster: after" in lines[0], (path, lines)
        assert f"its nodes hold 0 of the {workers} workers (cluster.scale_up_timeout_s 1)" in lines[0]
    assert logs.count("cluster: waiting for the autoscaler: its 1 node(s) hold 0 of the") == len(GPU_CONFIGS)
    assert "can grow to" not in logs and "Traceback" not in logs


# -- the headline command, the wheel, dataprep ------------------------------------------------------


@pytest.mark.slow
def test_headline_command_from_another_directory(demo_corpus, tmp_path):
    """`--config coatnet6` from outside the checkout: the shipped config resolves and validates,
    and preflight (a private local Ray of this machine's 2 CPUs, which never grows) says the
    cluster is too small, at once."""
    from coatnet_scale.config import load_config

    assert load_config("coatnet6.yaml") == load_config("coatnet6") == load_config(REPO / "configs" / "coatnet6.yaml")
    mine = tmp_path / "coatnet6.yaml"
    mine.write_text((REPO / "configs" / "coatnet6.yaml").read_text().replace("coatnet6-in21k-224", "my-coatnet6"))
    os.chdir(tmp_path)  # pytest's monkeypatch would do; the process's own cwd is restored below
    try:
        assert load_config("coatnet6.yaml").run_name == "my-coatnet6"  # an explicit path wins
    finally:
        os.chdir(REPO)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    result = subprocess.run(
        [sys.executable, "-m", "coatnet_scale.pretrain", "--config", "coatnet6", f"--set=storage.url={tmp_path / 'runs'}",
         *(f"--set={o}" for o in data_overrides(demo_corpus)), "--set=model.num_classes=10"],
        capture_output=True, text=True, cwd=tmp_path / "..", env=env, timeout=180,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(r"pretrain: cluster: 256 workers need 2048 CPU in all, the Ray cluster has \d+\n", result.stderr)


@pytest.mark.slow
def test_wheel_ships_the_configs(tmp_path):
    """A non-editable install: the wheel holds every package of the checkout and the configs,
    and `--config coatnet6` resolves to the installed copy."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_bytes((REPO / name).read_bytes())
    for name in ("coatnet_scale", "dataprep", "monitoring", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(source)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("coatnet_scale-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    packages = {str(p.parent.relative_to(REPO)) for top in ("coatnet_scale", "dataprep", "monitoring")
                for p in (REPO / top).rglob("__init__.py")}
    assert all(f"{package}/__init__.py" in names for package in packages), packages - {n.rpartition("/")[0] for n in names}
    assert {f"coatnet_scale/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")} <= set(names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    result = subprocess.run(
        [sys.executable, "-c", "from coatnet_scale.config import load_config, resolve_config; "
                               "print(resolve_config('coatnet6'), load_config('coatnet6').model.name)"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)}, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(target / "coatnet_scale" / "configs" / "coatnet6.yaml"), "coatnet_6"]
    # The monitoring files are package data: the installed monitoring.cluster finds its own.
    result = subprocess.run([sys.executable, "-m", "monitoring.cluster", "--help"], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    shipped = target / "monitoring"
    assert f"dashboards: {shipped / 'grafana'}: coatnet-pretraining.json" in result.stdout, result.stdout[-1000:]
    assert f"alert rules: {shipped / 'alerts.yml'}\n" in result.stdout
    assert (shipped / "grafana" / "coatnet-pretraining.json").is_file() and (shipped / "alerts.yml").is_file()
    assert (shipped / "grafana" / "provisioning" / "dashboards" / "coatnet.yml").is_file()


def test_dataprep_fails_fast_on_an_unreachable_cluster(tmp_path):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "dataprep", str(tmp_path), str(tmp_path / "out"), "--ray",
                             f"127.0.0.1:{_free_port()}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and time.monotonic() - start < 20
    assert "dataprep: error: --ray 127.0.0.1:" in result.stderr and "no Ray cluster answers there" in result.stderr
