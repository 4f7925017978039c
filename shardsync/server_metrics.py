"""The sync server's Prometheus metrics: a registry of their own, served on a port of their
own (`[sync] metrics_port`, `/metrics`), apart from the port devices reach. The README's
"Sync server metrics" table lists them (`tests/test_docs.py` keeps the two equal).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class SyncMetrics:
    """Every metric `serve` exports (one set per server, so several can share a process)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("slipstream_sync_requests", "Sync requests answered, by endpoint "
                                "and status code", ["endpoint", "status"], registry=r)
        self.snapshots = Counter("slipstream_sync_snapshots", "Snapshots served, by how the file "
                                 "was made: export, cached or caught_up", ["source"], registry=r)
        self.snapshot_seconds = Histogram(
            "slipstream_sync_snapshot_seconds", "Seconds to make a snapshot's file (an export, a "
            "catch-up or a cache check), before sending it", ["source"], registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.long_polls = Gauge("slipstream_sync_long_polls", "Live requests waiting for a change",
                                registry=r)
        self.cache_bytes = Gauge("slipstream_sync_snapshot_cache_bytes", "Disk held by the "
                                 "snapshot cache", registry=r)

    def watch_cache(self, size: Callable[[], int]) -> None:
        """Read the cache's size at each scrape."""
        self.cache_bytes.set_function(size)

    def serve(self, host: str, port: int) -> MetricsEndpoint:
        """Serve `/metrics` on `host:port` in a thread of its own until `stop()`."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsEndpoint(server, thread)


class MetricsEndpoint:
    """A running `/metrics` listener."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self.server, self.thread = server, thread
        self.port = server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
