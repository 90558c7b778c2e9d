"""Monitoring against a real Prometheus (Debian's package, see .ci/run): a tiny pretraining run's
workers found through their file_sd list and scraped, every PromQL expression of the Grafana
dashboard answered, metric names and labels as specified, a taken port that training survives;
dataprep's own metrics; the exporter's defaults and the shipped configs."""
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import _free_port
from corpus import write_image_folder
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "monitoring"
DASHBOARD = MONITORING / "grafana" / "coatnet-pretraining.json"
TINY = REPO / "configs" / "tiny.yaml"
DEMO = REPO / "data" / "demo"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
needs_prometheus = pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="needs Debian's prometheus package (.ci/run installs it)")

# The specification (issue 6), written out here rather than read from the code: family name ->
# (type, labels besides run, node and rank).
EXPECTED = {
    # throughput
    "coatnet_images_per_second": ("gauge", set()),
    "coatnet_images_total": ("counter", set()),
    "coatnet_steps_total": ("counter", set()),
    "coatnet_step_seconds": ("histogram", set()),
    "coatnet_data_wait_seconds": ("histogram", set()),
    # learning
    "coatnet_loss": ("gauge", set()),
    "coatnet_learning_rate": ("gauge", set()),
    "coatnet_gradient_norm": ("gauge", set()),
    "coatnet_validation_top1_ratio": ("gauge", {"weights"}),
    "coatnet_validation_top5_ratio": ("gauge", {"weights"}),
    "coatnet_epoch": ("gauge", set()),
    "coatnet_step": ("gauge", set()),
    # efficiency
    "coatnet_model_flops_per_second": ("gauge", set()),
    "coatnet_mfu_ratio": ("gauge", set()),
    "coatnet_hardware_flops_utilisation_ratio": ("gauge", set()),
    # health
    "coatnet_device_memory_allocated_bytes": ("gauge", {"device"}),
    "coatnet_device_memory_peak_bytes": ("gauge", {"device"}),
    "coatnet_corrupt_samples_total": ("counter", set()),
    "coatnet_checkpoint_blocked_seconds": ("gauge", set()),
    "coatnet_checkpoint_upload_seconds": ("gauge", set()),
    "coatnet_checkpoint_uploads_in_flight": ("gauge", set()),
    "coatnet_preemption_notices_total": ("counter", set()),
    "coatnet_checkpoint_failed_saves_total": ("counter", set()),
    "coatnet_checkpoint_last_step": ("gauge", set()),
    "coatnet_checkpoint_last_timestamp_seconds": ("gauge", set()),
    "coatnet_worker_group_restarts_total": ("counter", set()),
    # run health (issue 17)
    "coatnet_skipped_steps_total": ("counter", set()),
    "coatnet_rollbacks": ("gauge", set()),
    "coatnet_last_rollback_timestamp_seconds": ("gauge", set()),
    "coatnet_compute_seconds": ("gauge", set()),
    "coatnet_last_step_timestamp_seconds": ("gauge", set()),
    "coatnet_straggler_ratio": ("gauge", set()),
    "coatnet_checkpoint_interval_steps": ("gauge", set()),
}
DATAPREP_EXPECTED = {"coatnet_dataprep_images_total", "coatnet_dataprep_rejected_total",
                     "coatnet_dataprep_shards_total", "coatnet_dataprep_written_bytes_total"}


def series_names(family: str, kind: str) -> set[str]:
    return {f"{family}_{s}" for s in ("bucket", "sum", "count")} if kind == "histogram" else {family}


def get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


class Prometheus:
    """A real Prometheus on loopback with its own storage, scraping every second the targets in
    `targets_dir`/*.json; the shipped monitoring/prometheus.yml with test paths and interval."""

    def __init__(self, root: Path, targets_dir: Path):
        config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
        jobs = [job for job in config["scrape_configs"] if job["job_name"] == "coatnet_scale"]
        jobs[0]["file_sd_configs"] = [{"files": [f"{targets_dir}/*.json"]}]
        config["scrape_configs"] = jobs  # not the machine's Ray: the test's run only
        config["rule_files"] = [str(MONITORING / name) for name in config["rule_files"]]  # the shipped alerts
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = open(root / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                get(f"{self.url}/-/ready", timeout=2)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"prometheus did not start:\n{(root / 'prometheus.log').read_text()}")
                time.sleep(0.2)

    def query(self, expr: str) -> list[dict]:
        body = json.loads(get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def api(self, path: str, **params) -> list:
        body = json.loads(get(f"{self.url}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)))
        assert body["status"] == "success", body
        return body["data"]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def dashboard_expressions(run: str, node: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, template variables substituted."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$run", run).replace("$node", re.escape(node))
            assert "$" not in expr, expr
            out.append((panel["title"], expr))
    return out


def finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def free_port_run(n: int) -> int:
    """A port P with P .. P+n-1 all free now, below Linux's ephemeral range (32768+, where
    outgoing connections and port-0 listeners such as Ray's take theirs) and above Ray's worker
    ports (10002-19999): what a fixed monitoring.port should be in production too."""
    rng = random.Random()
    for _ in range(100):
        base = rng.randrange(20000, 32768 - n)
        sockets = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise AssertionError("no run of free ports")


@pytest.fixture(scope="module")
def demo_corpus():
    if not (DEMO / "val" / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "dataprep", "demo", str(DEMO)], check=True, cwd=REPO)
    return DEMO


# Long enough that Prometheus scrapes several steps: it takes up to ~6 s to act on a new file_sd
# list (its discovery manager batches updates for 5 s), and on an idle machine 10 tiny steps took 4 s.
STEPS = 40
WORKERS = 3


@needs_prometheus
@pytest.mark.slow
def test_prometheus_scrapes_every_worker_and_answers_every_dashboard_query(demo_corpus, tmp_path):
    """3 workers with monitoring.port=P serve on P, P+1, P+2; the test holds P+2 first, so rank 2
    runs without its exporter (one warning) and the run still finishes. Prometheus finds ranks 0
    and 1 through the run's file_sd list and every dashboard expression returns data.

    The workers keep serving monitoring.linger_seconds after the last step, so the final values
    (last checkpoint, final evaluation) are scraped, as a production run's should be."""
    targets_dir, run, node = tmp_path / "targets", "monitored", socket.gethostname()
    targets_dir.mkdir()
    base = free_port_run(WORKERS)
    overrides = [
        f"storage.url={tmp_path / 'runs'}", f"run_name={run}",
        f"data.train_manifest={demo_corpus}/train/manifest.json", f"data.val_manifest={demo_corpus}/val/manifest.json",
        f"cluster.num_workers={WORKERS}", "cluster.cpus_per_worker=0.5", f"train.global_batch_size={32 * WORKERS}",
        "data.num_workers=0",  # decode in the training process: 3 ranks on 2 cores are crowded enough
        f"train.total_steps={STEPS}", "train.warmup_steps=2", "train.log_every=10", "train.eval_every=20",
        "checkpoint.every_steps=20", f"monitoring.port={base}", f"monitoring.targets_dir={targets_dir}",
        "monitoring.linger_seconds=10", "monitoring.straggler_every_steps=10",
    ]
    expressions = dashboard_expressions(run, node)
    targets_file = targets_dir / f"{run}.json"
    listed, answered, seen = None, {}, None
    with socket.socket() as taken, open(tmp_path / "pretrain.log", "w+") as log:
        taken.bind(("127.0.0.1", base + WORKERS - 1))
        taken.listen()
        prometheus = Prometheus(tmp_path, targets_dir)
        process = None
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "coatnet_scale.pretrain", "--config", str(TINY), *(f"--set={o}" for o in overrides)],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )
            deadline = time.monotonic() + 400
            while process.poll() is None and time.monotonic() < deadline:
                if listed is None and targets_file.exists():
                    listed = json.loads(targets_file.read_text())
                # Each panel's expression until it has returned data: asked while training runs,
                # since a rate over a minute has none once the last steps are a minute old (the
                # final evaluation and checkpoint can take that long on a loaded machine).
                if listed is not None:
                    for _, expr in expressions:
                        if not finite(answered.get(expr, [])):
                            answered[expr] = prometheus.query(expr)
                # The final values: every rank at the last step, after its checkpoint, taken
                # while the exporters linger.
                if len(prometheus.query(f'coatnet_checkpoint_last_step{{run="{run}"}} == {STEPS}')) == WORKERS - 1:
                    seen = _snapshot(prometheus, run)
                    if all(finite(answered.get(expr, [])) for _, expr in expressions):
                        break
                time.sleep(1)
            returncode = process.wait(timeout=120)
        finally:
            if process is not None and process.poll() is None:  # failed: let the driver stop its Ray first
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
            prometheus.stop()
        log.seek(0)
        output = log.read()
    assert returncode == 0, output[-4000:]
    assert re.search(rf"pretrain: {run} finished: step {STEPS}\b", output), output[-3000:]
    assert seen is not None, "Prometheus never saw every rank's final checkpoint step"

    # Every dashboard expression returned data.
    empty = [(title, expr) for title, expr in expressions if not finite(answered.get(expr, []))]
    assert not empty, f"dashboard queries with no data: {empty}"
    assert run in seen["runs"] and node in seen["nodes"]  # the template variables' queries

    # The taken port: one warning from the rank that wanted it, and training went on.
    warnings = [line for line in output.splitlines() if f"cannot serve /metrics on 127.0.0.1:{base + WORKERS - 1}" in line]
    assert len(warnings) == 1, output[-4000:]
    assert f"rank {WORKERS - 1} metrics" in warnings[0]

    # Discovery: rank 0 listed every live exporter, on loopback, each on its own port.
    expected_targets = {f"127.0.0.1:{base + r}": str(r) for r in range(WORKERS - 1)}
    assert listed is not None, "no target list appeared while the run was going"
    assert {t["targets"][0]: t["labels"]["rank"] for t in listed} == expected_targets
    assert all(t["labels"] == {"run": run, "node": node, "rank": t["labels"]["rank"]} for t in listed)
    assert not targets_file.exists(), "the finished run's target list was not withdrawn"
    assert {(u["metric"]["instance"], u["value"][1]) for u in seen["up"]} == {(t, "1") for t in expected_targets}

    # Names and labels: exactly the specified families, each with run, node and rank.
    found: dict[str, set] = {}
    for s in seen["series"]:
        found.setdefault(s["__name__"], set()).add(frozenset(s.items()))
    assert set(found) == set().union(*(series_names(f, kind) for f, (kind, _) in EXPECTED.items()))
    for family, (kind, extra) in EXPECTED.items():
        for name in series_names(family, kind):
            for labels in map(dict, found[name]):
                want = {"__name__", "instance", "job", "run", "node", "rank"} | extra | ({"le"} if name.endswith("_bucket") else set())
                assert set(labels) == want, (name, labels)
                assert labels["run"] == run and labels["node"] == node and labels["rank"] in {"0", "1"}

    # The values say what happened: STEPS steps per rank, from the start, on a CPU.
    def by_rank(name):
        return {r["metric"]["rank"]: float(r["value"][1]) for r in seen[name]}

    assert by_rank("coatnet_steps_total") == {"0": STEPS, "1": STEPS}
    assert by_rank("coatnet_step") == {"0": STEPS, "1": STEPS}
    # Exact-once epochs: each rank reads its share of the demo's training set (a third, give or
    # take one sample) per epoch, in batches of 32 and a last smaller one; the rest are steps of 32.
    samples = sum(shard["samples"] for shard in json.loads((demo_corpus / "train" / "manifest.json").read_text())["shards"])
    share = samples // WORKERS
    epochs, rest = divmod(STEPS, -(-share // 32))
    assert epochs >= 1, "the run is meant to cross an epoch boundary"
    shares = {epochs * share + 32 * rest, epochs * (share + 1) + 32 * rest}
    images = by_rank("coatnet_images_total")
    assert set(images) == {"0", "1"} and set(images.values()) <= shares, (images, shares)
    assert by_rank("coatnet_worker_group_restarts_total") == {"0": 0, "1": 0}
    assert len(list((tmp_path / "runs" / run / "monitoring" / "group_starts").glob("*.json"))) == 1  # rank 0 noted the start
    assert by_rank("coatnet_epoch") == {"0": epochs, "1": epochs}
    assert all(0 < v < 1 for v in by_rank("coatnet_mfu_ratio").values())
    assert all(v > 0 for v in by_rank("coatnet_gradient_norm").values())
    assert all(0 < v <= 1e-3 for v in by_rank("coatnet_learning_rate").values())
    assert all(0 <= float(r["value"][1]) <= 1 and r["metric"]["weights"] == "raw" for r in seen["coatnet_validation_top1_ratio"])
    assert all(r["metric"]["device"] == "cpu" and float(r["value"][1]) > 50e6 for r in seen["coatnet_device_memory_peak_bytes"])
    # Run health: nothing skipped, the ranks compared (each near the median), the last step recent.
    assert by_rank("coatnet_skipped_steps_total") == {"0": 0, "1": 0}
    assert all(0.2 < v < 5 for v in by_rank("coatnet_straggler_ratio").values())
    assert all(0 < v < seen["time"] and seen["time"] - v < 120 for v in by_rank("coatnet_last_step_timestamp_seconds").values())
    # Prometheus loaded the shipped alert rules and evaluates them without errors.
    rules = [rule for group in seen["rules"] for rule in group["rules"]]
    assert len(rules) == 7 and all(rule["health"] == "ok" for rule in rules), rules


def _snapshot(prometheus: Prometheus, run: str) -> dict:
    """The run's series, targets, label values and the values the test checks, as of now."""
    seen = {name: prometheus.query(f'{name}{{run="{run}"}}') for name in (
        "coatnet_steps_total", "coatnet_images_total", "coatnet_step", "coatnet_mfu_ratio", "coatnet_gradient_norm",
        "coatnet_learning_rate", "coatnet_validation_top1_ratio", "coatnet_device_memory_peak_bytes",
        "coatnet_worker_group_restarts_total", "coatnet_epoch", "coatnet_skipped_steps_total", "coatnet_straggler_ratio",
        "coatnet_last_step_timestamp_seconds")}
    seen["time"] = time.time()
    seen["rules"] = prometheus.api("rules")["groups"]
    seen["series"] = prometheus.api("series", **{"match[]": f'{{__name__=~"coatnet_.+", run="{run}"}}'})
    seen["up"] = prometheus.query(f'up{{run="{run}"}}')
    seen["runs"] = prometheus.api("label/run/values", **{"match[]": "coatnet_step"})
    seen["nodes"] = prometheus.api("label/node/values", **{"match[]": f'coatnet_step{{run=~"{run}"}}'})
    return seen


def test_exporter_binds_loopback_by_default():
    from coatnet_scale.config import MonitoringConfig
    from monitoring.exporter import serve
    from monitoring.training import TrainingMonitor

    config = MonitoringConfig()
    monitor = TrainingMonitor({"run": "r", "node": "n", "rank": "0"})
    exporter = serve(monitor.registry, config.address, config.port, "test")
    try:
        assert exporter.server.server_address[0] == "127.0.0.1"
        assert b"coatnet_steps_total" in get(f"http://127.0.0.1:{exporter.port}/metrics")
        other = _outward_address()
        if other is not None:  # the same port on the machine's own address: nobody listens
            with pytest.raises(OSError):
                socket.create_connection((other, exporter.port), timeout=2).close()
    finally:
        exporter.stop()


def _outward_address() -> str | None:
    """This machine's non-loopback address, if it has one (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_taken_port_warns_once_and_the_monitor_still_works(caplog):
    from monitoring.exporter import serve
    from monitoring.training import TrainingMonitor

    monitor = TrainingMonitor({"run": "r", "node": "n", "rank": "3"})
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with caplog.at_level("WARNING"):
            assert serve(monitor.registry, "127.0.0.1", port, "rank 3 metrics") is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"rank 3 metrics: cannot serve /metrics on 127.0.0.1:{port}" in warnings[0]
    # Without an exporter the monitor keeps counting; the training loop never notices.
    monitor.batch(time.monotonic(), {"labels": [0] * 8, "corrupt": 1})
    monitor.step(1, 0, 2.0, 1e-3, 1.0)
    monitor.log()
    monitor.close()
    labels = {"run": "r", "node": "n", "rank": "3"}
    assert monitor.registry.get_sample_value("coatnet_images_total", labels) == 8
    assert monitor.registry.get_sample_value("coatnet_corrupt_samples_total", labels) == 1


def test_the_monitor_offers_every_call_the_worker_makes():
    """The loop calls the real monitor and, with monitoring.enabled false, Unmonitored: both must
    take every call it makes."""
    from coatnet_scale.engine.monitor import Unmonitored
    from monitoring.training import TrainingMonitor

    calls = set(re.findall(r"\bmonitor\.(\w+)\(", (REPO / "coatnet_scale/engine/worker.py").read_text()))
    assert {"batch", "step", "log", "evaluated", "checkpoint_saved", "checkpoint_complete", "close"} <= calls
    assert calls <= set(dir(TrainingMonitor))
    for call in calls:
        assert getattr(Unmonitored(), call)() is None


def test_worker_group_restarts_are_counted_per_job(tmp_path):
    from coatnet_scale.engine.monitor import record_group_start

    run = str(tmp_path / "run")
    assert record_group_start(run, {}, "session_a-job01000000") == 0
    assert record_group_start(run, {}, "session_a-job01000000") == 1  # Ray restarted the group
    assert record_group_start(run, {}, "session_b-job01000000") == 0  # the command run again: a new job
    assert record_group_start(run, {}, "session_a-job01000000") == 2


def test_target_list_is_replaced_whole(tmp_path):
    from coatnet_scale.engine.monitor import remove_targets, write_targets

    path = tmp_path / "sd" / "run.json"
    write_targets(str(path), [("127.0.0.1:1", {"rank": "0"})])
    first = path.stat().st_ino
    write_targets(str(path), [("127.0.0.1:2", {"rank": "0"}), ("127.0.0.1:3", {"rank": "1"})])
    assert path.stat().st_ino != first  # renamed into place, never rewritten where Prometheus reads
    assert json.loads(path.read_text()) == [{"targets": ["127.0.0.1:2"], "labels": {"rank": "0"}},
                                            {"targets": ["127.0.0.1:3"], "labels": {"rank": "1"}}]
    assert path.stat().st_mode & 0o044 == 0o044  # readable by a prometheus user
    assert os.listdir(path.parent) == ["run.json"]
    remove_targets(str(path))
    assert not path.exists()


def test_dataprep_serves_its_counts(tmp_path):
    source, dest = tmp_path / "source", tmp_path / "dest"
    write_image_folder(source, per_class=4)
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dataprep", str(source), str(dest), "--samples-per-shard", "5", "--workers", "1",
         "--metrics-port", str(port), "--metrics-linger", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # SIGABRT prints every thread's stack
    )
    lines: list[str] = []

    def read() -> None:
        for line in process.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline, counts = time.monotonic() + 120, None
        while time.monotonic() < deadline and process.poll() is None:
            # Lingering: the dataset is complete and the counts final. A Ctrl-C before that
            # would interrupt the run itself.
            if any(line.startswith("dataprep: serving the final counts") for line in lines[:]):
                counts = _scrape(f"http://127.0.0.1:{port}/metrics")
                break
            time.sleep(0.2)
        assert counts is not None, "dataprep did not finish while serving /metrics:\n" + "".join(lines)[-3000:]
        process.send_signal(signal.SIGINT)  # ends the linger (which ends by itself after 20 s anyway)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:  # once in CI it outlived a 30 s wait: say where it was
            process.send_signal(signal.SIGABRT)
            process.wait(timeout=30)
            reader.join(timeout=10)
            raise AssertionError("dataprep still running 90 s after SIGINT:\n" + "".join(lines)[-6000:]) from None
        reader.join(timeout=30)
        output = "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    manifest = json.loads((dest / "manifest.json").read_text())
    assert {name for name, _ in counts} == DATAPREP_EXPECTED
    assert counts[("coatnet_dataprep_images_total", ())] == manifest["total_samples"]
    assert counts[("coatnet_dataprep_shards_total", ())] == len(manifest["shards"])
    assert counts[("coatnet_dataprep_written_bytes_total", ())] == sum(s["bytes"] for s in manifest["shards"])
    rejected = {dict(labels)["reason"]: v for (name, labels), v in counts.items() if name == "coatnet_dataprep_rejected_total"}
    assert rejected == manifest["rejected"] and sum(rejected.values()) >= 7  # tests/corpus.py's bad inputs
    assert f"metrics on http://127.0.0.1:{port}/metrics" in output


def _scrape(url: str) -> dict:
    """{(sample name, labels other than split): value} from a /metrics page."""
    out = {}
    for family in text_string_to_metric_families(get(url).decode()):
        for sample in family.samples:
            if sample.name.startswith("coatnet_") and not sample.name.endswith("_created"):
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "split"))
                assert sample.labels.get("split") == "train"
                out[(sample.name, labels)] = sample.value
    return out


@needs_prometheus
def test_alert_rules_check_and_pass_their_unit_tests():
    """promtool's own rule checks, and tests/promtool/alerts_test.yml: every alert of
    monitoring/alerts.yml fires where it should and stays silent where it should not."""
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    check = subprocess.run([promtool, "check", "rules", str(MONITORING / "alerts.yml")], capture_output=True, text=True)
    assert check.returncode == 0 and "SUCCESS: 7 rules found" in check.stdout, check.stdout + check.stderr
    tests = REPO / "tests" / "promtool" / "alerts_test.yml"
    alerts = {r["alert"] for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load(tests.read_text())["tests"] for t in case["alert_rule_test"]}
    assert alerts == tested  # a case for every alert
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_prometheus
def test_shipped_configs_are_valid_and_consistent():
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    check = subprocess.run([promtool, "check", "config", str(MONITORING / "prometheus.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    compose = yaml.safe_load((MONITORING / "docker-compose.yml").read_text())
    mounts = [v.split(":")[:2] for service in compose["services"].values() for v in service.get("volumes", [])]
    for source, target in mounts:  # every file the compose file mounts from the repository exists
        if source.startswith("./"):
            assert (MONITORING / source).exists(), source
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/coatnet.yml").read_text())
    dashboards = provider["providers"][0]["options"]["path"]
    assert [t for s, t in mounts if s.endswith(".json")] == [f"{dashboards}/{DASHBOARD.name}"]
    datasource = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    listen = compose["services"]["prometheus"]["command"]
    assert f"--web.listen-address={datasource['url'].removeprefix('http://')}" in listen
    assert all("127.0.0.1" in a for a in listen if a.startswith("--web.listen-address"))
    dashboard = json.loads(DASHBOARD.read_text())
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"run", "node"}


# -- tracking sinks: TensorBoard, W&B (offline) -------------------------------------------------


@pytest.fixture
def own_wandb_service():
    """W&B's service, started in this process, is named in os.environ (WANDB_SERVICE): a Ray
    cluster started later by this process would hand it to its workers, and a killed worker's run
    would stay "in use" there. End it with the test."""
    yield
    import wandb

    wandb.teardown()
    os.environ.pop("WANDB_SERVICE", None)


def test_tracking_sinks_continue_through_a_rollback_and_a_restart(tmp_path, own_wandb_service):
    """Rank 0's tracker, as the engine starts it (engine/tracking.py), fed the loop's calls: steps
    1-10, a rollback to 6, steps 7-12, then new processes resuming at step 10 through 14; each
    sink reads back one history (the tools' own readers: tests/tracked.py)."""
    from tracked import raw_tensorboard_steps, tensorboard_scalars, tensorboard_texts, wandb_files, wandb_history

    from coatnet_scale.config import Config
    from coatnet_scale.engine.tracking import Fanout, start_tracker
    from coatnet_scale.engine.monitor import Unmonitored

    config = Config(run_name="r", storage={"url": str(tmp_path / "runs")},
                    monitoring={"tensorboard": str(tmp_path / "tb"), "wandb": {"project": "p", "mode": "offline",
                                                                             "dir": str(tmp_path / "wb")}})

    def train(tracker, steps, scale):
        for step in steps:
            tracker.batch(time.monotonic(), {"labels": [0] * 8})
            tracker.step(step, 0, scale / step, 1e-3, 0.5)
            if step % 2 == 0:
                tracker.log()

    tracker = start_tracker(config, 0, 2, 0, flops=1e9, peak=1e12)
    assert start_tracker(config, 1, 2, 0) is None  # rank 0 only
    train(tracker, range(1, 11), 1.0)
    tracker.rolled_back(1, time.time())
    tracker.resumed(6, 0)
    train(tracker, range(7, 13), 2.0)
    # a crash: no close; the process ends (W&B's service writes out what it was sent), and new
    # processes resume from the checkpoint of step 10
    next(sink for sink in tracker.sinks if sink.label == "W&B").run.finish()
    tracker = Fanout(Unmonitored(), start_tracker(config, 0, 2, 10))
    tracker.linger_seconds = 0  # the loop sets it on its monitor: the first one takes it
    train(tracker, range(11, 15), 3.0)
    tracker.evaluated({"top1": 0.5, "top5": 0.9, "samples": 10})
    tracker.close()

    board = tmp_path / "tb" / "r"
    assert raw_tensorboard_steps(board, "train/loss") == [2, 4, 6, 8, 10, 8, 10, 12, 12, 14]
    loss = tensorboard_scalars(board, "train/loss")
    assert [(s, round(v, 4)) for s, v in loss] == [(2, 0.5), (4, 0.25), (6, 0.1667), (8, 0.25), (10, 0.2),
                                                    (12, 0.25), (14, 0.2143)]
    assert tensorboard_scalars(board, "eval/top1") == [(14, 0.5)]
    assert tensorboard_scalars(board, "health/rollbacks") == [(8, 1.0)]
    rates, mfu = (dict(tensorboard_scalars(board, f"perf/{name}")) for name in ("images_per_second", "mfu"))
    assert sorted(mfu) == [2, 4, 6, 8, 10]  # the restart at 10 was told no FLOPs: no MFU past it
    assert mfu[10] == pytest.approx(rates[10] / 2 * 1e9 / 1e12, rel=1e-5)  # rank 0's rate times 2 workers
    assert [t for _, t in tensorboard_texts(board, "events")] == [
        "rolled back: training again from the checkpoint of step 6", "resumed from the checkpoint of step 10"]

    state = json.loads((tmp_path / "runs" / "r" / "monitoring" / "tracking.json").read_text())
    assert wandb_files(tmp_path / "wb", state["wandb_id"])  # one offline run per process (per second), one id
    history = wandb_history(tmp_path / "wb", state["wandb_id"])
    steps = [row["_step"] for row in history]
    assert steps == sorted(set(steps)) and steps[-1] == state["wandb_step"]
    # The point of step 12 before the crash was still held (its step not over): lost with the process.
    assert [row["train/step"] for row in history if "train/loss" in row] == [2, 4, 6, 8, 10, 8, 10, 12, 14]
    assert [row["train/loss"] for row in history if "train/loss" in row][-1] == pytest.approx(3 / 14)
    assert history[-1]["eval/top1"] == 0.5


def test_a_sink_asked_for_but_not_installed_is_one_line_at_validation(monkeypatch):
    from coatnet_scale.config import ConfigError, load_config

    for package, key in (("tensorboard", "monitoring.tensorboard=/tmp/board"), ("wandb", "monitoring.wandb.project=p")):
        monkeypatch.setitem(sys.modules, package, None)  # importlib finds no such package
        with pytest.raises(ConfigError) as error:
            load_config(str(REPO / "configs" / "tiny.yaml"), [key])
        field = key.split(".")[1].split("=")[0]
        message = str(error.value)
        assert message.startswith(f"--set {key}: monitoring.{field}: needs the {package} package: pip install "
                                  f"'coatnet_scale[{package}]'") and "\n" not in message, message
        monkeypatch.delitem(sys.modules, package)


def test_tensorboard_to_object_storage(s3_bucket, tmp_path):
    """monitoring.tensorboard as an S3 URL: the event files are written locally and copied up at
    each log line; TensorBoard reads them from a copy of the bucket's folder."""
    import s3fs
    from tracked import tensorboard_scalars

    from coatnet_scale.config import Config
    from coatnet_scale.engine.tracking import start_tracker

    config = Config(run_name="r", storage={"url": str(tmp_path / "runs")},
                    monitoring={"tensorboard": f"s3://{s3_bucket}/boards"})
    tracker = start_tracker(config, 0, 1, 0)
    for step in range(1, 5):
        tracker.step(step, 0, 1.0 / step, 1e-3)
        tracker.log()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.get(f"{s3_bucket}/boards/r/", str(tmp_path / "copy"), recursive=True)  # before close: copied as it goes
    assert [step for step, _ in tensorboard_scalars(tmp_path / "copy", "train/loss")] == [1, 2, 3, 4]
    tracker.close()
