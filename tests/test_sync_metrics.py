"""The sync server's /metrics, on its own port, fed by real requests over real HTTP.

Each count is checked against the requests the test made: answers by endpoint and
status, snapshots by how their file was made with their timing, the live requests
waiting at the moment of a scrape, and the snapshot cache's disk.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from slipstream.shardsync.server import ServerSettings
from slipstream.shardsync.tokens import TokenVerifier, issue_token

from .cli_harness import free_port
from .shardsync_helpers import doc
from .sync_server_helpers import RunningServer

SECRET = "metrics-test-secret-" + "m" * 32


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_what_the_server_answered(writer, pg_dsn, tmp_path):
    writer.apply([doc(str(i), "A", f"note number {i}") for i in range(20)])
    port = free_port()
    server = RunningServer(ServerSettings(dsn=pg_dsn, verifier=TokenVerifier(SECRET),
                                          metrics_port=port, tmp_dir=str(tmp_path)))
    auth = {"authorization": f"Bearer {issue_token(SECRET, ['A'], ttl=600)}"}
    try:
        assert httpx.get(f"{server.url}/metrics", timeout=5).status_code == 404  # devices' port
        for _ in range(2):
            r = httpx.get(f"{server.url}/v1/snapshot", params={"spaces": "local"}, headers=auth,
                          timeout=30)
            assert r.status_code == 200
        assert httpx.get(f"{server.url}/v1/changes", params={"cursor": 0}, headers=auth,
                         timeout=10).status_code == 200
        assert httpx.get(f"{server.url}/v1/changes", params={"cursor": 0},
                         timeout=10).status_code == 401
        assert httpx.get(f"{server.url}/v1/changes", params={"cursor": "x"}, headers=auth,
                         timeout=10).status_code == 400

        m = scrape(port)
        assert m[("slipstream_sync_requests_total", (("endpoint", "snapshot"), ("status", "200")))] == 2
        assert m[("slipstream_sync_requests_total", (("endpoint", "changes"), ("status", "200")))] == 1
        assert m[("slipstream_sync_requests_total", (("endpoint", "changes"), ("status", "401")))] == 1
        assert m[("slipstream_sync_requests_total", (("endpoint", "changes"), ("status", "400")))] == 1
        assert m[("slipstream_sync_snapshots_total", (("source", "export"),))] == 1
        assert m[("slipstream_sync_snapshots_total", (("source", "cached"),))] == 1
        assert m[("slipstream_sync_snapshot_seconds_count", (("source", "export"),))] == 1
        assert m[("slipstream_sync_snapshot_seconds_sum", (("source", "export"),))] > 0
        cached_file = next(tmp_path.glob("slipstream-snapshots-*/*.db"))
        assert m[("slipstream_sync_snapshot_cache_bytes", ())] == cached_file.stat().st_size
        assert m[("slipstream_sync_long_polls", ())] == 0

        # A live request waits: the gauge shows it until a commit wakes it.
        cursor = int(r.headers["slipstream-cursor"])
        answered = []
        poll = threading.Thread(target=lambda: answered.append(httpx.get(
            f"{server.url}/v1/changes", params={"cursor": cursor, "live": "true", "wait": 20},
            headers=auth, timeout=30)))
        poll.start()
        deadline = time.monotonic() + 10
        while scrape(port)[("slipstream_sync_long_polls", ())] != 1:
            assert time.monotonic() < deadline, "the waiting long-poll never showed"
            time.sleep(0.05)
        writer.apply([doc("new", "A", "a change that wakes it")])
        poll.join(30)
        assert answered and answered[0].status_code == 200 and answered[0].json()["entries"]
        assert scrape(port)[("slipstream_sync_long_polls", ())] == 0
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):  # the listener stopped with the server
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
