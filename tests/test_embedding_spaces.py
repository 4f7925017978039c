"""Several spaces end to end: a 1536-d space over HTTP and a 384-d local space on one table.

Each space has its own embedder; both are written by the worker from the stream and
queried on their own; a row opted out of a space is lexical-only there; a device
shard carrying only the local space ranks exactly as the server does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import psycopg
import pytest
from slipstream.index import HashingEmbedder, IndexDoc, SearchIndex, SQLiteBackend
from slipstream.worker.embedders import HttpEmbedder
from slipstream.worker.errors import RetryPolicy

from .fake_openai import FakeEmbeddings, model_vectors
from .worker_harness import NOTES_DDL, Harness

SERVER, LOCAL = 1536, 384


def mapper(row: Mapping[str, object], op: str) -> list[IndexDoc]:
    # "private" notes stay off devices' vector space: server space only
    spaces = ("server",) if row["status"] == "private" else None
    return [IndexDoc("note", str(row["id"]), title=str(row["title"] or ""), body=str(row["body"] or ""),
                     partition=str(row["owner"]), attrs={"status": row["status"]}, embed_spaces=spaces)]


@pytest.fixture
def fake():
    with FakeEmbeddings({"big-model": SERVER}) as server:
        yield server


def test_server_and_local_spaces_on_one_table(pg_dsn: str, fake: FakeEmbeddings) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(NOTES_DDL)
    embedders = {"server": HttpEmbedder(fake.url, "big-model", SERVER, retry=RetryPolicy(max_attempts=1)),
                 "local": HashingEmbedder(LOCAL)}
    harness = Harness(pg_dsn, {"public.notes": mapper}, embedder=embedders,
                      spaces={"server": SERVER, "local": LOCAL})
    harness.setup()
    harness.start()
    rows = [("alpine hiking routes", "trails above the tree line", "open"),
            ("sourdough starter", "feeding schedule for wild yeast", "open"),
            ("hiking boots review", "waterproof leather boots", "private"),
            ("tax return checklist", "documents for the accountant", "open")]
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for title, body, status in rows:
                conn.execute("INSERT INTO notes (owner, title, body, status) VALUES ('ann', %s, %s, %s)",
                             (title, body, status))
        harness.wait_caught_up()
        # the HTTP space got every row's text; the local space was never sent over HTTP
        assert sorted(fake.texts()) == sorted(f"{t}\n{b}" for t, b, _ in rows)
        private = harness.backend.get("note", "3")
        assert set(private["vectors"]) == {"server"}  # opted out of "local"
        assert np.allclose(private["vectors"]["server"],
                           model_vectors("big-model", SERVER, ["hiking boots review\nwaterproof leather boots"])[0])
        assert harness.backend.get("note", "1")["vectors"]["local"].shape == (LOCAL,)

        index = harness.index
        server_hits = index.search("hiking boots", space="server", partition="ann")
        local_hits = index.search("hiking boots", space="local", partition="ann")
        by_id = {r.object_id: r for r in server_hits}
        assert by_id["3"].semantic_rank is not None  # in the server space: both channels
        local = {r.object_id: r for r in local_hits}
        assert local["3"].lexical_rank is not None and local["3"].semantic_rank is None
        assert local["3"].match_type == "lexical"

        # a device shard with only the local space: same docs, same ranking
        device = SearchIndex(SQLiteBackend(":memory:", spaces={"local": LOCAL}), HashingEmbedder(LOCAL))
        device_docs = [mapper({"id": i + 1, "owner": "ann", "title": t, "body": b, "status": s}, "i")[0]
                       for i, (t, b, s) in enumerate(rows)]
        device.upsert_many([dataclasses.replace(d, embed_spaces=None if d.embed_spaces is None else ())
                            for d in device_docs])  # the shard carries only the local space
        for query in ("hiking boots", "yeast", "accountant documents"):
            server_side = [(r.object_id, r.score) for r in index.search(query, space="local", partition="ann")]
            device_side = [(r.object_id, r.score) for r in device.search(query, space="local", partition="ann")]
            assert server_side == device_side
    finally:
        harness.close()
