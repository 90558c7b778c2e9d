"""Prometheus and Grafana on a cluster's head node, provisioned from this folder.

    python -m monitoring.cluster --targets s3://my-bucket/runs/prometheus [--dir ~/monitoring]

The training workers' rank 0 writes each run's target list (file_sd JSON, every worker under
its node's address with `monitoring.address: node`) to `monitoring.targets_dir`, by default
{storage.url}/prometheus: object storage, which Prometheus's file_sd cannot read. So this
copies those lists to {dir}/targets every --sync-every seconds (and removes the ones a
finished run withdrew), and runs, until stopped:

- Prometheus on 127.0.0.1:{--prometheus-port}: the workers' lists, Ray's own service-discovery
  file on the head (every node's Ray metrics), and the alert rules monitoring/alerts.yml
  (a glob: loaded when the file is there);
- Grafana on 127.0.0.1:{--grafana-port}, when a Grafana is installed (`grafana` on PATH or under
  $GRAFANA_HOME; launch/Dockerfile has one), with that Prometheus as its data source and the
  dashboards of monitoring/grafana/.

Both listen on loopback only: reach them through an SSH tunnel (`ray dashboard
launch/cluster-aws.yaml -p 3000 -p 9090`) or `kubectl port-forward` (docs/cluster.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import yaml

HERE = Path(__file__).resolve().parent
RAY_DISCOVERY = "/tmp/ray/prom_metrics_service_discovery.json"  # written by Ray's head node


def prometheus_config(folder: Path, scrape_interval: str) -> dict:
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(HERE / "alerts*.yml")],  # a glob: monitoring/alerts.yml once it exists, else none
        "scrape_configs": [
            # The workers export run, node and rank themselves; the lists carry the same labels.
            {"job_name": "coatnet_scale", "honor_labels": True,
             "file_sd_configs": [{"files": [str(folder / "targets" / "*.json")], "refresh_interval": "5s"}]},
            {"job_name": "ray", "file_sd_configs": [{"files": [RAY_DISCOVERY]}]},
        ],
    }


def grafana_provisioning(folder: Path, prometheus_port: int, scrape_interval: str) -> Path:
    """Grafana's provisioning folder: the data source on our port, the dashboards from here."""
    root = folder / "grafana" / "provisioning"
    for sub in ("datasources", "dashboards", "plugins", "alerting"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "datasources" / "prometheus.yml").write_text(yaml.safe_dump({"apiVersion": 1, "datasources": [{
        "name": "Prometheus", "uid": "prometheus", "type": "prometheus", "access": "proxy", "isDefault": True,
        "url": f"http://127.0.0.1:{prometheus_port}", "jsonData": {"timeInterval": scrape_interval}}]}))
    (root / "dashboards" / "coatnet.yml").write_text(yaml.safe_dump({"apiVersion": 1, "providers": [{
        "name": "coatnet_scale", "folder": "coatnet_scale", "type": "file", "allowUiUpdates": True,
        "options": {"path": str(HERE / "grafana")}}]}))
    return root


def find_grafana() -> list[str] | None:
    """The command that starts Grafana's server, or None when none is installed."""
    home = os.environ.get("GRAFANA_HOME")
    binary = shutil.which("grafana") or (home and shutil.which("grafana", path=f"{home}/bin"))
    if binary:
        return [binary, "server", *(["--homepath", home] if home else [])]
    return None


def sync_targets(url: str, local: Path) -> set[str]:
    """Copy every {url}/*.json to `local` (each atomically), remove the local ones gone from
    `url`; returns the names now there."""
    fs, path = fsspec.core.url_to_fs(url)  # S3 endpoint and credentials from the AWS environment
    names = set()
    for remote in fs.glob(f"{path.rstrip('/')}/*.json"):
        name = remote.rpartition("/")[2]
        data = fs.cat_file(remote)
        try:
            json.loads(data)
        except ValueError:  # caught between a writer's writes: take it next time
            continue
        tmp = local / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(local / name)  # Prometheus never reads half a file
        names.add(name)
    for stale in local.glob("*.json"):
        if stale.name not in names:
            stale.unlink()
    return names


def shipped_files() -> str:
    """Where the dashboards and alert rules are read from: the package, installed or checked out."""
    dashboards = sorted(p.name for p in (HERE / "grafana").glob("*.json"))
    alerts = HERE / "alerts.yml"
    return (f"dashboards: {HERE / 'grafana'}: {', '.join(dashboards) or 'none found'}\n"
            f"alert rules: {alerts}{'' if alerts.exists() else ' (missing)'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.cluster", description=__doc__, epilog=shipped_files(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", required=True, help="the runs' target lists: monitoring.targets_dir, "
                                                         "by default {storage.url}/prometheus")
    parser.add_argument("--dir", type=Path, default=Path.home() / "monitoring",
                        help="Prometheus's data, its config and the copied lists (default ~/monitoring)")
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--grafana-port", type=int, default=3000)
    parser.add_argument("--scrape-interval", default="15s")
    parser.add_argument("--sync-every", type=float, default=15.0, help="seconds between copies of the lists")
    parser.add_argument("--no-grafana", action="store_true", help="Prometheus only")
    args = parser.parse_args(argv)

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        parser.error("no prometheus on PATH (launch/Dockerfile installs one; Debian/Ubuntu: apt install prometheus)")
    if not list((HERE / "grafana").glob("*.json")):  # an installed package without them: run from the checkout
        parser.error(f"no dashboard in {HERE / 'grafana'}: this install lacks the package data (pip install the wheel)")
    folder = args.dir.expanduser().resolve()
    (folder / "targets").mkdir(parents=True, exist_ok=True)
    try:
        sync_targets(args.targets, folder / "targets")
    except Exception as e:  # a wrong URL or missing permission: say so now, not every 15 s
        parser.error(f"--targets {args.targets}: cannot list it: {type(e).__name__}: {e}")
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(folder, args.scrape_interval), sort_keys=False))
    children = [subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                                  f"--web.listen-address=127.0.0.1:{args.prometheus_port}"])]
    grafana = None if args.no_grafana else find_grafana()
    if grafana:
        provisioning = grafana_provisioning(folder, args.prometheus_port, args.scrape_interval)
        env = {**os.environ, "GF_PATHS_PROVISIONING": str(provisioning), "GF_PATHS_DATA": str(folder / "grafana" / "data"),
               "GF_SERVER_HTTP_ADDR": "127.0.0.1", "GF_SERVER_HTTP_PORT": str(args.grafana_port)}
        children.append(subprocess.Popen(grafana, env=env, cwd=folder))
    elif not args.no_grafana:
        print("monitoring: no Grafana installed (grafana on PATH or $GRAFANA_HOME): Prometheus only", file=sys.stderr)
    print(f"monitoring: Prometheus on 127.0.0.1:{args.prometheus_port}"
          + (f", Grafana on 127.0.0.1:{args.grafana_port}" if grafana else "")
          + f"; target lists from {args.targets} every {args.sync_every:g} s", flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while all(child.poll() is None for child in children):
            time.sleep(args.sync_every)
            try:
                sync_targets(args.targets, folder / "targets")
            except Exception as e:  # storage hiccups pass; Prometheus keeps the last lists
                print(f"monitoring: cannot copy the target lists: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(timeout=30)
    failed = [child.args[0] for child in children if child.returncode not in (0, -signal.SIGTERM)]
    if failed:
        print(f"monitoring: {', '.join(map(str, failed))} stopped", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
