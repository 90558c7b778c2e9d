"""Shared fixtures: free ports, a real S3 endpoint on loopback (moto's threaded server, as
s3fs's own tests use), real Ray clusters on loopback (`ray start`; two nodes for multi-node
tests)."""
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "data" / "demo"
# DeepSpeed builds its CPU shared-memory op (deepspeed_shm_comm) on first use, ~1-2 min of the
# compiler, into ~/.cache/torch_extensions by default: shared by every venv on the machine,
# whose include paths differ, so each venv's run rebuilds over the other's. One build folder per
# venv (inherited by the subprocesses, torchrun ranks and Ray workers the tests start).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
# The embedded default's demo corpus (~/.cache/coatnet_scale/demo for a user) is this checkout's
# data/demo for the tests and every process they start, Ray's workers included.
os.environ["COATNET_SCALE_DEMO_DIR"] = str(DEMO)


@pytest.fixture
def unused_tcp_port() -> int:
    return _free_port()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 HTTP endpoint on 127.0.0.1 with fake credentials in the environment, so
    subprocesses (dataprep, Ray workers) reach it through the standard AWS variables."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing-key-id", AWS_SECRET_ACCESS_KEY="testing-secret-key",
        AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint,
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh, empty bucket; returns its name."""
    import s3fs

    name = "test-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir(name)
    return name


@pytest.fixture(scope="session")
def demo_corpus():
    """scikit-learn's digits as dataprep shards (data/demo/{train,val}), built once."""
    if not (DEMO / "val" / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "dataprep", "demo", str(DEMO)], check=True, cwd=REPO)
    return DEMO


@pytest.fixture(scope="session")
def hub_parquet(demo_corpus, tmp_path_factory):
    """The demo digits as the Hugging Face Hub lays out an image dataset (data/train-0000K-of-
    00002.parquet, data/validation-00000-of-00001.parquet), written by pyarrow alone with three
    bad rows, then sharded by `python -m dataprep` from the parquet files. Returns (the shards'
    folder with train/ and val/, the parquet folder, the bad rows as (path suffix, reason))."""
    from corpus import digits_as_hub_parquet

    root = tmp_path_factory.mktemp("hub")
    bad = digits_as_hub_parquet(demo_corpus / "raw", root / "data")
    for split, files in (("train", "train-*.parquet"), ("val", "validation-*.parquet")):
        subprocess.run([sys.executable, "-m", "dataprep", str(root / "data" / files), str(root / "shards" / split),
                        "--split", split, "--samples-per-shard", "64", "--workers", "2"],
                       check=True, capture_output=True, timeout=300)
    return root / "shards", root / "data", bad


RAY = str(Path(sys.executable).parent / "ray")
# Every port of a node explicit, so nothing collides with another Ray on the machine.
NODE_PORTS = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
              "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")


class RayCluster:
    """`ray start --head --block` on loopback (token authentication when `env` asks for it),
    plus any nodes `add_node` starts; stopped by their pids and the pids of their sessions.
    `address` is the GCS (ray.init, `ray start --address`), `dashboard` the job API."""

    def __init__(self, env: dict, num_cpus: float = 2, head_args: tuple = (), node_ip: str = "127.0.0.1",
                 port: int | None = None):
        self.env, self.node_ip = env, node_ip
        self.temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a limit
        self.temp_dirs, self.nodes = [self.temp_dir], []
        self.dashboard = ""
        ports = {flag: _free_port() for flag in ("--port", "--dashboard-port", "--ray-client-server-port", *NODE_PORTS)}
        ports["--port"] = port or ports["--port"]
        self.process = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address", node_ip,
             "--dashboard-host", "127.0.0.1", "--num-cpus", str(num_cpus), "--temp-dir", self.temp_dir,
             "--disable-usage-stats", *head_args, *[str(x) for flag_port in ports.items() for x in flag_port]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        self.address = f"{node_ip}:{ports['--port']}"
        self.dashboard = f"http://127.0.0.1:{ports['--dashboard-port']}"
        try:
            from ray.job_submission import JobSubmissionClient

            deadline = time.monotonic() + 120
            while True:
                try:
                    self.client = JobSubmissionClient(self.dashboard)
                    break
                except Exception:
                    assert time.monotonic() < deadline and self.process.poll() is None, "ray start failed"
                    time.sleep(1)
        except BaseException:
            self.stop()
            raise

    def add_node(self, num_cpus: float, node_ip: str = "127.0.0.1", timeout: float = 60) -> subprocess.Popen:
        """Another raylet on this machine joining the head (`ray start --address`), with its own
        resources, temp folder and ports; any 127.x.y.z is this machine's loopback too, and
        gives the node an address of its own. Returns once the cluster lists it alive."""
        temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        before = sum(n["node_ip"] == node_ip for n in self.alive_nodes())
        process = subprocess.Popen(
            [RAY, "start", "--address", self.address, "--block", "--node-ip-address", node_ip,
             "--num-cpus", str(num_cpus), "--temp-dir", temp_dir, "--disable-usage-stats",
             *[str(x) for flag in NODE_PORTS for x in (flag, _free_port())]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env,
        )
        self.nodes.append(process)
        deadline = time.monotonic() + timeout
        while sum(n["node_ip"] == node_ip for n in self.alive_nodes()) <= before:
            assert time.monotonic() < deadline and process.poll() is None, f"ray start --address {self.address} failed"
            time.sleep(0.5)
        return process

    def alive_nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.dashboard) if n["state"] == "ALIVE"]

    def stop(self):
        # SIGINT, not SIGTERM: on SIGTERM `ray start --block` first drains its node (a
        # preemption notice, up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, 30 s) while any actor
        # lives, as Ray Train's leave, so each stop waited out the 10 s below; on SIGINT it
        # stops its processes at once (~2 s).
        for process in [*self.nodes, self.process]:
            process.send_signal(signal.SIGINT)
        for process in [*self.nodes, self.process]:
            try:
                process.wait(timeout=10)  # what outlives it is killed by its session folder below
            except subprocess.TimeoutExpired:
                process.kill()
        # Nodes an autoscaler started keep the head's session name, not its temp folder.
        session = Path(self.temp_dir, "session_latest").resolve().name
        for pattern in [*self.temp_dirs, *([session] if session.startswith("session_2") else [])]:
            mine = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
            for pid in mine:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def ray_client_environment(multi_node: bool = False):
    """This process's environment as a Ray cluster's nodes and clients need it, for as long as
    the cluster lives: token authentication with a token of its own (clients read it from the
    environment), no RAY_ADDRESS of another cluster, job entrypoints' `python` this venv's.
    One node: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from replacing 127.0.0.1 with the
    machine's address. Several: that setting refuses `ray start --address`, so it is unset, and
    every node's address is given explicitly, none of them 127.0.0.1 (the one Ray replaces)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "token")
        env.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        if multi_node:
            env.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
        else:
            env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        env.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        env.delenv("RAY_ADDRESS", raising=False)
        _reload_ray_auth()
        try:
            yield
        finally:
            env.undo()
            _reload_ray_auth()


def _reload_ray_auth() -> None:
    """Ray reads the authentication mode and token once per process and caches them; this
    process's clients must see the current cluster's, not an earlier test module's."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def two_node_cluster(s3_endpoint):
    """A Ray cluster of two nodes on this machine's loopback, token authentication on: the head
    on 127.0.0.2 (dashboard and job API on 127.0.0.1) and a second raylet on 127.0.0.3, each
    with 2 logical CPUs (4 one-CPU workers fit, 2 per node). Submit jobs to `dashboard`; a
    driver started in the test process connects with ray.init(address=cluster.address,
    _node_ip_address=cluster.node_ip). Workers see the S3 endpoint on loopback through the AWS
    environment; a local storage path is node-local here, as on a real cluster, so give runs
    s3:// storage (the `s3_bucket` fixture) or storage.shared: true. One cluster per test
    module; `add_node` starts another node (after a test removes one, say). A node's `ray start
    --block` that gets SIGTERM drains the node for up to 20 s (Ray's default 30) before it goes."""
    with ray_client_environment(multi_node=True):
        # A test that takes a node away waits less for Ray to notice: the GCS health-checks each
        # raylet every second, not every 3 s (dead after 5 failed checks: ~5 s, not ~15 s), and
        # Ray Train gives up on a worker group whose placement group is not ready after 10 s, not
        # 60 s. A group restarted before the node is declared dead asks for the dead node's CPUs
        # and waited out the whole 60 s; after 10 s it is retried (controller errors are retried
        # without limit) and finds the node gone. Placement on a live cluster takes milliseconds.
        env = {**os.environ, "RAY_health_check_period_ms": "1000", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "20"}
        cluster = RayCluster(env, num_cpus=2, node_ip="127.0.0.2")
        try:
            cluster.add_node(num_cpus=2, node_ip="127.0.0.3")
            yield cluster
        finally:
            cluster.stop()
