"""The pretraining engine end to end: a real Ray cluster and `ray job submit`, DeepSpeed ZeRO-3
on 2 CPU workers, checkpoints, exact resume, a killed worker, and fast failure on bad configs."""
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import _free_port

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
DEMO = REPO / "data" / "demo"


@pytest.fixture(scope="module")
def demo_corpus():
    if not (DEMO / "val" / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "coatnet_scale.data", "demo", str(DEMO)], check=True, cwd=REPO)
    return DEMO


def pretrain_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "coatnet_scale.pretrain", "--config", str(TINY), *(f"--set={o}" for o in overrides)]


def absolute_data(corpus: Path) -> list[str]:
    return [f"data.train_manifest={corpus}/train/manifest.json", f"data.val_manifest={corpus}/val/manifest.json"]


def read_metrics(storage: Path, run_name: str) -> dict:
    files = sorted((storage / run_name).glob("metrics-step*.json"))
    return json.loads(files[-1].read_text())


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.global_batch_size=100", "train.global_batch_size=100 must equal train.micro_batch_size=32 x "
                                        "train.grad_accum_steps=1 x cluster.num_workers=2 (= 64)"),
        ("model.name=coatnet_9", "model.name: unknown model; did you mean coatnet_"),
        ("data.train_manifest=/nonexistent/train/manifest.json", "data.train_manifest: cannot read /nonexistent/train/manifest.json"),
        ("storage.url=/proc/coatnet-scale-cannot-write-here", "storage.url: cannot use /proc/coatnet-scale-cannot-write-here"),
        ("model.num_classes=7", "has 10 classes but model.num_classes is 7"),
    ],
)
def test_bad_config_fails_before_any_worker(demo_corpus, tmp_path, override, message):
    start = time.monotonic()
    result = subprocess.run(pretrain_command(f"storage.url={tmp_path}", override), capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "Ray" not in result.stderr  # no cluster was started
    assert time.monotonic() - start < 60


def test_more_workers_than_the_cluster_holds(demo_corpus, tmp_path):
    result = subprocess.run(
        pretrain_command(f"storage.url={tmp_path}", "cluster.num_workers=16", "train.global_batch_size=512"),
        capture_output=True, text=True, cwd=REPO, timeout=180,
    )
    assert result.returncode == 2
    assert re.search(r"pretrain: cluster: 16 workers need 16 CPU in all, the Ray cluster has \d+", result.stderr)
    assert "RayTrainWorker" not in result.stdout + result.stderr


RESUME_SCRIPT = """
import sys
from coatnet_scale.pretrain import main
common = sys.argv[1:]
for run in (["run_name=straight"], ["run_name=resumed", "train.stop_at_step=6"], ["run_name=resumed"]):
    code = main(["--config", "{tiny}", *[f"--set={{o}}" for o in common + run]])
    assert code == 0, run
"""


def test_resume_is_bit_identical(demo_corpus, tmp_path):
    """12 steps straight == 6 steps, stop, resume, 6 more: the same losses to the last bit,
    with stochastic depth on (RNG states) and checkpointing mid-epoch (loader position)."""
    overrides = [f"storage.url={tmp_path}", *absolute_data(demo_corpus), "train.total_steps=12", "train.warmup_steps=3",
                 "train.log_every=1", "checkpoint.every_steps=6", "model.drop_path_rate=0.2", "data.randaugment_ops=2"]
    script = RESUME_SCRIPT.format(tiny=TINY)
    result = subprocess.run([sys.executable, "-c", script, *overrides], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    straight = read_metrics(tmp_path, "straight")["history"]
    first = json.loads((tmp_path / "resumed" / "metrics-step000000006.json").read_text())["history"]
    second = json.loads((tmp_path / "resumed" / "metrics-step000000012.json").read_text())["history"]
    assert [h["step"] for h in first + second] == list(range(1, 13))
    assert [h["loss"] for h in first + second] == [h["loss"] for h in straight]
    assert "resumed from" in result.stdout + result.stderr


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
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        mine = subprocess.run(["pgrep", "-f", self.temp_dir], capture_output=True, text=True).stdout.split()
        for pid in mine:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def test_ray_job_submit_trains_and_survives_a_killed_worker(demo_corpus, tmp_path, monkeypatch):
    # Token authentication on, with a token of this test's own (clients read it from the env).
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = RayCluster(dict(os.environ))
    try:
        command = pretrain_command(f"storage.url={tmp_path}", *absolute_data(demo_corpus), "run_name=job")
        for attempt in range(30):  # the head's job agent comes up a few seconds after the dashboard
            submit = subprocess.run(
                [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.dashboard,
                 "--submission-id", "tiny-job", "--no-wait", "--", *command],
                capture_output=True, text=True, timeout=120,
            )
            if submit.returncode == 0 or "No available agent" not in submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stderr[-2000:]

        # Once the first checkpoint (step 50) is complete, kill one training worker outright.
        marker = tmp_path / "job" / "checkpoints" / "step_000000050" / "COMPLETE.json"
        deadline = time.monotonic() + 600
        while not marker.exists():
            status = cluster.client.get_job_status("tiny-job")
            assert status.is_terminal() is False and time.monotonic() < deadline, cluster.client.get_job_logs("tiny-job")[-3000:]
            time.sleep(0.5)
        from ray.util.state import list_actors

        workers = list_actors(address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        assert len(workers) == 2
        os.kill(workers[1]["pid"], signal.SIGKILL)

        while not cluster.client.get_job_status("tiny-job").is_terminal():
            assert time.monotonic() < deadline
            time.sleep(2)
        logs = cluster.client.get_job_logs("tiny-job")
        assert str(cluster.client.get_job_status("tiny-job")) == "SUCCEEDED", logs[-4000:]
    finally:
        cluster.stop()

    assert re.search(r"resumed from .*step_0000000(50|100): step (50|100)", logs), "the restarted group did not resume"
    held = re.search(r"ZeRO-3: rank 0 holds ([\d,]+) of ([\d,]+) parameters", logs)
    assert held and 0.45 < int(held[1].replace(",", "")) / int(held[2].replace(",", "")) < 0.55
    metrics = read_metrics(tmp_path, "job")
    assert metrics["final"]["step"] == 150
    history = metrics["history"]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"], "the loss did not fall"
    # Ten digit classes: chance is 10%; an uninterrupted run of this config reaches 96%.
    assert metrics["final"]["val_top1"] > 0.85
