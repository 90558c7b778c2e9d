"""Serving /metrics and telling Prometheus where to find it.

`serve` starts a prometheus-client HTTP exporter for one registry; when it cannot bind (port
taken, bad address) it logs one warning line and returns None, so the caller goes on without
it: metrics are never a reason to stop training or data preparation.

`file_sd` is the Prometheus file-based service-discovery document (a list of
{"targets": ["host:port"], "labels": {...}}) a caller publishes where Prometheus reads it.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry

log = logging.getLogger("coatnet_scale.monitoring")

WILDCARD_ADDRESSES = {"", "0.0.0.0", "::"}


@dataclass
class Exporter:
    server: object  # the WSGI server prometheus-client started in a daemon thread
    address: str
    port: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(registry: CollectorRegistry, address: str, port: int, what: str) -> Exporter | None:
    """Serve `registry` on address:port (0: a free port). None, after one warning, on failure."""
    # `_created` samples would double the series count and no panel reads them.
    prometheus_client.disable_created_metrics()
    try:
        server, _ = prometheus_client.start_http_server(port, addr=address, registry=registry)
    except Exception as e:  # OSError for a taken port, gaierror for a bad address, ...
        log.warning("%s: cannot serve /metrics on %s:%s (%s: %s); continuing without the exporter",
                    what, address, port, type(e).__name__, e)
        return None
    return Exporter(server, address, server.server_port)


def linger(seconds: float) -> None:
    """Keep exporters serving a little longer so a scrape collects the final values. Ctrl-C ends it."""
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        pass


def file_sd(targets: list[tuple[str, dict]]) -> bytes:
    """The file_sd document for (host:port, labels) pairs: one target group per target."""
    return json.dumps([{"targets": [t], "labels": labels} for t, labels in targets], indent=1).encode()


def advertised_host(address: str, node_ip: str | None) -> str:
    """The host Prometheus should scrape: the bound address, or the node's IP for a wildcard."""
    if address in WILDCARD_ADDRESSES:
        return node_ip or "127.0.0.1"
    return f"[{address}]" if ":" in address else address
