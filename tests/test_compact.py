"""Compaction: superseded entries go without changing what any reader gets; old tombstones
go from the log and from docs, the horizon rises, and a stale cursor must resync."""

from __future__ import annotations

import random
import threading
from datetime import timedelta

import psycopg
import pytest
from slipstream.index import HashingEmbedder, SearchIndex
from slipstream.index.errors import ValidationError
from slipstream.shardsync.changelog import ChangeLog
from slipstream.shardsync.compact import DEFAULT_RETENTION, compact
from slipstream.shardsync.errors import ResyncRequired
from slipstream.shardsync.export import export_shard
from slipstream.shardsync.reader import changes_since
from slipstream.shardsync.shard import apply_page, open_shard, shard_cursor

from .shardsync_helpers import (
    DIM,
    LogWriter,
    assert_same_search,
    doc,
    pull,
    random_doc,
    server_rows,
    shard_rows,
)


@pytest.fixture
def conn(pg_dsn: str):
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        yield c


def sync(shard, conn) -> None:
    pull(shard, conn, ["A"], limit=7)


def log_of(conn) -> list[tuple]:
    return conn.execute("SELECT seq, partition, object_type, object_id, node_kind, op "
                        "FROM slipstream.changes ORDER BY seq").fetchall()


def test_superseded_entries_go_and_every_reader_still_converges(writer: LogWriter, conn, tmp_path) -> None:
    rng = random.Random(3)
    shards = []
    for round_ in range(5):
        writer.apply([random_doc(rng, str(i), ["A", "B"]) for i in rng.sample(range(30), 12)])
        writer.apply(deletes=[(t, str(i), n) for i in rng.sample(range(30), 3)
                              for t in ("note", "task") for n in ("leaf", "chunk")])
        path = tmp_path / f"s{round_}.db"
        export_shard(conn, "slipstream", ["A"], path, ["local"])
        shards.append(open_shard(path))
    before = log_of(conn)
    report = compact(conn)  # default retention: no tombstone is old enough
    after = log_of(conn)
    assert report.superseded == len(before) - len(after) > 0
    assert report.tombstones == report.docs_purged == report.horizon == 0
    # Exactly one entry per (partition, key) remains: the last one it had.
    last = {}
    for seq, *key in before:
        last[tuple(key[:-1])] = seq
    assert sorted(last.values()) == [seq for seq, *_ in after]
    writer.apply([random_doc(rng, str(i), ["A", "B"]) for i in range(5)])
    for shard in shards:  # readers at every cursor reach the same state
        sync(shard, conn)
        assert shard_rows(shard) == server_rows(writer.dsn, ["A"], ["local"])
        assert_same_search(writer.index, SearchIndex(shard, HashingEmbedder(DIM)), "A")


def test_old_tombstones_go_and_a_stale_cursor_must_resync(writer: LogWriter, conn, tmp_path) -> None:
    writer.apply([doc(str(i), "A", "apple") for i in range(6)] + [doc("m", "A", "mover")])
    export_shard(conn, "slipstream", ["A"], tmp_path / "stale.db", ["local"])
    stale = open_shard(tmp_path / "stale.db")
    writer.apply(deletes=[("note", "1", "leaf"), ("note", "2", "leaf")])
    delete_seq = ChangeLog().max_seq(conn)
    writer.apply([doc("m", "B", "mover moved")])  # a d in A, a u in B
    move_seq = ChangeLog().max_seq(conn)
    export_shard(conn, "slipstream", ["A"], tmp_path / "fresh.db", ["local"])
    fresh = open_shard(tmp_path / "fresh.db")
    writer.apply([doc("7", "A", "apple seven")])

    kept = compact(conn, retention=DEFAULT_RETENTION)
    assert kept.tombstones == 0 and kept.horizon == 0
    report = compact(conn, retention=timedelta(0))
    assert report.tombstones == 3  # two deletes and the move's d in A
    assert report.docs_purged == 2
    assert report.horizon == move_seq - 1 >= delete_seq
    assert ChangeLog().horizon(conn) == report.horizon
    (n,) = conn.execute("SELECT count(*) FROM slipstream.docs WHERE deleted").fetchone()
    assert n == 0
    assert [op for *_, op in log_of(conn)].count("d") == 0

    with pytest.raises(ResyncRequired) as info:
        changes_since(conn, "slipstream", ["A"], shard_cursor(stale))
    assert info.value.horizon == report.horizon
    sync(fresh, conn)  # at or past the horizon: deltas still work
    assert shard_rows(fresh) == server_rows(writer.dsn, ["A"], ["local"])
    # The stale device re-exports into a new file and swaps it in.
    export_shard(conn, "slipstream", ["A"], tmp_path / "stale.db", ["local"])
    stale = open_shard(tmp_path / "stale.db")
    assert shard_rows(stale) == server_rows(writer.dsn, ["A"], ["local"])
    assert shard_cursor(stale) >= report.horizon
    assert ChangeLog().max_seq(conn) >= report.horizon


def test_compaction_beside_a_writer_loses_nothing(writer: LogWriter, conn, pg_dsn: str, tmp_path) -> None:
    export_shard(conn, "slipstream", ["A"], tmp_path / "a.db", ["local"])
    shard = open_shard(tmp_path / "a.db")
    stop = threading.Event()

    def write() -> None:
        rng, w = random.Random(5), LogWriter(pg_dsn)
        try:
            while not stop.is_set():
                w.apply([random_doc(rng, str(i), ["A", "B"]) for i in rng.sample(range(20), 4)])
                w.apply(deletes=[("note", str(rng.randrange(20)), "leaf")])
        finally:
            w.close()

    thread = threading.Thread(target=write)
    thread.start()
    try:
        for _ in range(8):
            compact(conn)  # superseded only: a syncing device never needs to resync
            sync(shard, conn)
    finally:
        stop.set()
        thread.join()
    sync(shard, conn)
    assert shard_rows(shard) == server_rows(pg_dsn, ["A"], ["local"])


@pytest.mark.parametrize("bad", [-1, timedelta(seconds=-1), "7d", True])
def test_bad_retention_is_refused(writer: LogWriter, conn, bad) -> None:
    with pytest.raises(ValidationError):
        compact(conn, retention=bad)


def test_the_docs_state_the_retention_and_channel_the_code_uses() -> None:
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "sync.md").read_text()
    section = doc[doc.index("## Change log and pages"):]
    assert DEFAULT_RETENTION == timedelta(days=7) and "7 days" in section
    assert f"`{ChangeLog('x').channel.replace('_x', '_<schema>')}`" in section
    for name in ("changelog_writer", "changelog_horizon", "changelog_migrations"):
        assert name in section
