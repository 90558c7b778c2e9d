"""Shared fixtures: free ports, and a real S3 endpoint on loopback (moto's threaded server,
as s3fs's own tests use)."""
import os
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
        subprocess.run([sys.executable, "-m", "coatnet_scale.data", "demo", str(DEMO)], check=True, cwd=REPO)
    return DEMO


class RayCluster:
    """`ray start --head --block` on loopback with token authentication, stopped by its pid
    and the pids of its session."""

    def __init__(self, env: dict):
        self.temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a limit
        self.dashboard = ""
        # Every port explicit, so nothing collides with another Ray on the machine.
        ports = {flag: _free_port() for flag in (
            "--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
            "--metrics-export-port", "--ray-client-server-port", "--runtime-env-agent-port",
            "--node-manager-port", "--object-manager-port",
        )}
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--temp-dir", self.temp_dir,
             *[str(x) for flag_port in ports.items() for x in flag_port]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
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

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)  # what outlives it is killed by its session folder below
        except subprocess.TimeoutExpired:
            self.process.kill()
        mine = subprocess.run(["pgrep", "-f", self.temp_dir], capture_output=True, text=True).stdout.split()
        for pid in mine:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
