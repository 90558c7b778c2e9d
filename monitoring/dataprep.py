"""dataprep's metrics: what `python -m dataprep ... --metrics-port N` serves while it runs.

The driver process sees every finished shard's record (its shard and the inputs it rejected)
and counts them here; image bytes never pass through it. Counts cover this process's work: a
resumed run does not count the shards an earlier run wrote. Serving starts with the first
record, after dataprep has forked its worker pool: the exporter's thread must not be forked.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from monitoring.exporter import Exporter, linger, serve


class DataprepMetrics:
    def __init__(self, split: str, address: str = "127.0.0.1", port: int = 0):
        self.address, self.port = address, port
        self.exporter: Exporter | None = None
        self._started = False
        self.registry = r = CollectorRegistry()
        labels = {"split": split}
        self.images = Counter("coatnet_dataprep_images_total", "Images written to shards as samples",
                              ["split"], registry=r).labels(**labels)
        self._rejected = Counter("coatnet_dataprep_rejected_total", "Inputs rejected, by reason",
                                 ["split", "reason"], registry=r)
        self.shards = Counter("coatnet_dataprep_shards_total", "Shards written", ["split"], registry=r).labels(**labels)
        self.bytes = Counter("coatnet_dataprep_written_bytes_total", "Bytes of shards written",
                             ["split"], registry=r).labels(**labels)
        self.split = split

    def observe(self, record: dict) -> None:
        """One progress record: {"shard": {"samples", "bytes", ...} or None, "rejected": [{"reason", ...}]}."""
        if not self._started:
            self._started = True
            self.exporter = serve(self.registry, self.address, self.port, "dataprep metrics")
            if self.exporter is not None:
                print(f"dataprep: metrics on http://{self.address}:{self.exporter.port}/metrics", flush=True)
        for rejection in record["rejected"]:
            self._rejected.labels(split=self.split, reason=rejection["reason"]).inc()
        shard = record["shard"]
        if shard is not None:
            self.images.inc(shard["samples"])
            self.shards.inc()
            self.bytes.inc(shard["bytes"])

    def close(self, linger_seconds: float = 0.0) -> None:
        """Keep serving `linger_seconds` (so the final counts are scraped), then stop."""
        if self.exporter is None:
            return
        if linger_seconds:
            print(f"dataprep: serving the final counts for {linger_seconds:g} s more (Ctrl-C ends it)", flush=True)
            linger(linger_seconds)
        self.exporter.stop()
        self.exporter = None
