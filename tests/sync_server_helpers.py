"""A real sync server for tests: uvicorn on a free 127.0.0.1 port, in a thread of this process.

`RunningServer(settings)` starts `create_app(settings)` and waits until it answers
/healthz; `stop()` asks uvicorn to exit and joins the thread. `shard_state(path)` and
`server_state(dsn, partitions)` read a shard and the server's docs the same way, so a
test can compare them field by field (vectors as raw float32 bytes).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence

import httpx
import psycopg
import uvicorn
from slipstream.shardsync.reader import register_vector_bytes
from slipstream.shardsync.server import ServerSettings, create_app

from .cli_harness import free_port


class RunningServer:
    def __init__(self, settings: ServerSettings) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="sync-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if not self.thread.is_alive():
                raise RuntimeError("the sync server did not start")
            time.sleep(0.05)
        raise TimeoutError("the sync server did not become healthy")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "the sync server did not stop"


def shard_state(path: str) -> dict[tuple, tuple]:
    """Live rows of a shard: key -> (partition, title, body, keywords, payload, attrs, tf,
    len_title, len_body, {space: vector bytes})."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        vectors: dict[int, dict[str, bytes]] = {}
        for doc_id, space, vec in conn.execute("SELECT doc_id, space, vec FROM vectors"):
            vectors.setdefault(doc_id, {})[space] = bytes(vec)
        out = {}
        for row in conn.execute(
                "SELECT id, object_type, object_id, node_kind, partition, title, body, keywords, "
                "payload, attrs, tf, len_title, len_body FROM docs WHERE deleted = 0"):
            out[(row[1], row[2], row[3])] = (
                row[4], row[5], row[6], json.loads(row[7]), json.loads(row[8]),
                json.loads(row[9]), {t: list(c) for t, c in json.loads(row[10]).items()},
                row[11], row[12], vectors.get(row[0], {}))
        return out
    finally:
        conn.close()


def server_state(dsn: str, partitions: Sequence[str], spaces: Sequence[str],
                 schema: str = "slipstream") -> dict[tuple, tuple]:
    """The same view of the server's live docs in `partitions`."""
    cols = ", ".join(f"emb_{s}" for s in spaces)
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor(binary=True) as cur:
        register_vector_bytes(conn, cur)
        cur.execute(
            f"SELECT object_type, object_id, node_kind, partition, title, body, keywords, "
            f"payload, attrs, tf, len_title, len_body{', ' + cols if cols else ''} "
            f"FROM {schema}.docs WHERE NOT deleted AND partition = ANY(%s)", [list(partitions)])
        out = {}
        for r in cur.fetchall():
            vecs = {s: v for s, v in zip(spaces, r[12:]) if v is not None}
            out[(r[0], r[1], r[2])] = (r[3], r[4], r[5], list(r[6]), r[7], r[8],
                                       {t: list(c) for t, c in r[9].items()}, r[10], r[11], vecs)
        return out
