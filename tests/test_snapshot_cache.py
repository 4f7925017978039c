"""The sync server's snapshot cache, against a real Postgres and real SQLite files.

Every served file is compared with the server's rows (vectors bit for bit) and with a
fresh `export_shard` of the same partitions: a cached file brought forward by the
change log must be indistinguishable from a new export at its cursor. Also: the key
covers partitions and spaces; stale entries (compaction, too many changes, a reset
log) are exported afresh; concurrent requests share one export; eviction bounds the
disk without breaking a file still being read; the server reports how it made each
snapshot and leaves no directory behind.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import httpx
import psycopg
import pytest
from slipstream.shardsync import snapshot_cache as cache_mod
from slipstream.shardsync.changelog import ChangeLog
from slipstream.shardsync.compact import compact
from slipstream.shardsync.export import export_shard
from slipstream.shardsync.server import CURSOR_HEADER, SOURCE_HEADER, ServerSettings
from slipstream.shardsync.shard import read_meta
from slipstream.shardsync.snapshot_cache import SnapshotCache
from slipstream.shardsync.tokens import TokenVerifier, issue_token

from .shardsync_helpers import VOCAB, doc
from .sync_server_helpers import RunningServer, server_state, shard_state

SECRET = "cache-test-secret-" + "x" * 32


def text(i: int) -> str:
    return " ".join(VOCAB[(i * 5 + j * 3) % len(VOCAB)] for j in range(5))


def served(snap, tmp_path: Path, name: str) -> Path:
    """Copy the served file out (as a device would receive it) and close it; the cursor
    it is served with is the one it holds."""
    out = tmp_path / name
    with snap.file as f, open(out, "wb") as dst:
        shutil.copyfileobj(f, dst)
    assert out.stat().st_size == snap.size
    assert read_meta(out)["cursor"] == str(snap.cursor)
    return out


def fresh(dsn: str, tmp_path: Path, partitions, spaces, name: str) -> tuple[Path, int]:
    path = tmp_path / name
    with psycopg.connect(dsn, autocommit=True) as conn:
        return path, export_shard(conn, "slipstream", partitions, path, spaces)


def assert_current(dsn: str, path: Path, partitions, spaces, tmp_path: Path) -> None:
    """The served file equals the server's rows and a fresh export of them."""
    expected = server_state(dsn, partitions, spaces)
    got = shard_state(str(path))
    assert got == expected
    again, _ = fresh(dsn, tmp_path, partitions, spaces, f"fresh-{path.name}")
    assert shard_state(str(again)) == got


def last_seq(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return ChangeLog("slipstream").max_seq(conn)


@pytest.fixture
def cache(pg_dsn, tmp_path):
    c = SnapshotCache(pg_dsn, "slipstream", 1 << 30, str(tmp_path))
    yield c
    c.close()


def test_a_cached_snapshot_is_brought_forward_to_equal_a_fresh_export(writer, cache, tmp_path):
    writer.apply([doc(str(i), "A" if i % 3 else "B", text(i)) for i in range(40)])
    first = cache.snapshot(["A"], ["local"])
    assert first.source == "export" and first.cursor == last_seq(writer.dsn)
    assert_current(writer.dsn, served(first, tmp_path, "1.db"), ["A"], ["local"], tmp_path)

    # Updates, a delete, moves both ways and an insert, over several transactions.
    writer.apply([doc("1", "A", "quarterly report"), doc("2", "A", text(99))])
    writer.apply([doc("4", "B", text(4))], deletes=[("note", "5", "leaf")])  # 4 leaves A
    writer.apply([doc("3", "A", "paris flight"), doc("100", "A", "new note")])  # 3 joins A
    second = cache.snapshot(["A"], ["local"])
    assert second.source == "caught_up" and second.cursor == last_seq(writer.dsn)
    path = served(second, tmp_path, "2.db")
    assert_current(writer.dsn, path, ["A"], ["local"], tmp_path)
    state = shard_state(str(path))
    assert ("note", "4", "leaf") not in state and ("note", "5", "leaf") not in state
    assert state[("note", "3", "leaf")][1] == "title 3 paris flight"

    third = cache.snapshot(["A"], ["local"])  # nothing new: the same file as is
    assert third.source == "cached" and third.cursor == second.cursor
    third.file.close()
    writer.apply([doc("6", "B", "only partition b")])  # another partition moved on
    fourth = cache.snapshot(["A"], ["local"])
    assert fourth.source == "cached" and fourth.cursor == second.cursor
    assert_current(writer.dsn, served(fourth, tmp_path, "4.db"), ["A"], ["local"], tmp_path)
    assert cache.exports == 1 and cache.hits == 3


def test_partitions_and_spaces_are_both_part_of_the_key(writer, cache, tmp_path):
    writer.apply([doc(str(i), "AB"[i % 2], text(i)) for i in range(20)])
    for parts, spaces in ((["A"], ["local"]), (["A"], []), (["A", "B"], ["local"]),
                          (["B", "A"], ["local"]), (["A"], ["local", "server"])):
        snap = cache.snapshot(parts, spaces)
        path = served(snap, tmp_path, f"{'-'.join(parts)}-{'-'.join(spaces)}.db")
        assert_current(writer.dsn, path, parts, spaces, tmp_path)
    assert cache.exports == 4  # ["B", "A"] is ["A", "B"]


def test_an_entry_below_the_compaction_horizon_is_exported_afresh(writer, cache, tmp_path):
    writer.apply([doc(str(i), "A", text(i)) for i in range(10)])
    cache.snapshot(["A"], ["local"]).file.close()
    writer.apply([doc("1", "A", "quarterly report")], deletes=[("note", "2", "leaf")])
    with psycopg.connect(writer.dsn, autocommit=True) as conn:
        horizon = compact(conn, retention=0).horizon
    snap = cache.snapshot(["A"], ["local"])
    assert horizon > 0 and snap.source == "export" and cache.exports == 2
    assert_current(writer.dsn, served(snap, tmp_path, "a.db"), ["A"], ["local"], tmp_path)


def test_more_changes_than_a_catch_up_is_worth_means_a_fresh_export(
        writer, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "MIN_CATCH_UP", 5)
    monkeypatch.setattr(cache_mod, "PAGE_LIMIT", 3)  # and the pages of a catch-up chain
    writer.apply([doc(str(i), "A", text(i)) for i in range(10)])
    cache.snapshot(["A"], ["local"]).file.close()
    writer.apply([doc(str(i), "A", text(i + 50)) for i in range(4)])
    snap = cache.snapshot(["A"], ["local"])
    assert snap.source == "caught_up"
    assert_current(writer.dsn, served(snap, tmp_path, "a.db"), ["A"], ["local"], tmp_path)
    writer.apply([doc(str(i), "A", text(i + 70)) for i in range(4)])  # 8 since the export
    snap = cache.snapshot(["A"], ["local"])
    assert snap.source == "export" and cache.exports == 2
    assert_current(writer.dsn, served(snap, tmp_path, "b.db"), ["A"], ["local"], tmp_path)


def test_an_entry_ahead_of_a_reset_log_is_exported_afresh(writer, cache, tmp_path):
    writer.apply([doc(str(i), "A", text(i)) for i in range(5)])
    cache.snapshot(["A"], ["local"]).file.close()
    with psycopg.connect(writer.dsn, autocommit=True) as conn:  # a restore from an older backup
        conn.execute("TRUNCATE slipstream.changes")
        conn.execute("UPDATE slipstream.docs SET deleted = true WHERE object_id = '1'")
    snap = cache.snapshot(["A"], ["local"])
    assert snap.source == "export" and snap.cursor == 0
    assert_current(writer.dsn, served(snap, tmp_path, "a.db"), ["A"], ["local"], tmp_path)


def test_concurrent_requests_for_one_partition_share_one_export(writer, cache, tmp_path):
    writer.apply([doc(str(i), "A", text(i)) for i in range(200)])
    results, errors = [], []
    start = threading.Barrier(8)

    def ask(n: int) -> None:
        try:
            start.wait()
            snap = cache.snapshot(["A"], ["local"])
            results.append((snap.source, snap.cursor, served(snap, tmp_path, f"{n}.db")))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 8
    assert cache.exports == 1 and sorted(s for s, _, _ in results) == ["cached"] * 7 + ["export"]
    assert not cache._locks  # a key's lock lives only while requests use it
    expected = server_state(writer.dsn, ["A"], ["local"])
    assert all(shard_state(str(p)) == expected for _, _, p in results)


def test_eviction_bounds_the_disk_and_a_file_being_read_survives_it(writer, pg_dsn, tmp_path):
    writer.apply([doc(str(i), "ABC"[i % 3], text(i)) for i in range(60)])
    probe = SnapshotCache(pg_dsn, "slipstream", 1 << 30, str(tmp_path))
    one = probe.snapshot(["A"], ["local"])
    one.file.close()
    probe.close()
    cache = SnapshotCache(pg_dsn, "slipstream", int(one.size * 1.5), str(tmp_path))
    try:
        held = cache.snapshot(["A"], ["local"])  # a response still streaming A ...
        cache.snapshot(["B"], ["local"]).file.close()  # ... when B's entry evicts A's
        assert len(list(cache.directory.glob("*.db"))) == 1
        assert_current(writer.dsn, served(held, tmp_path, "a.db"), ["A"], ["local"], tmp_path)
        again = cache.snapshot(["A"], ["local"])
        assert again.source == "export" and cache.exports == 3
        again.file.close()
        assert len(list(cache.directory.glob("*.db"))) == 1
    finally:
        cache.close()
    assert not cache.directory.exists()


def test_a_zero_byte_cache_exports_every_time_and_keeps_nothing(writer, pg_dsn, tmp_path):
    writer.apply([doc(str(i), "A", text(i)) for i in range(10)])
    cache = SnapshotCache(pg_dsn, "slipstream", 0, str(tmp_path))
    try:
        for n in range(2):
            snap = cache.snapshot(["A"], ["local"])
            assert snap.source == "export" and not list(cache.directory.iterdir())
            assert_current(writer.dsn, served(snap, tmp_path, f"{n}.db"), ["A"], ["local"], tmp_path)
        assert cache.exports == 2
    finally:
        cache.close()


def test_the_server_serves_cached_snapshots_and_removes_its_directory_on_exit(
        writer, pg_dsn, tmp_path):
    writer.apply([doc(str(i), "A", text(i)) for i in range(30)])
    cache_parent = tmp_path / "cache"
    cache_parent.mkdir()
    server = RunningServer(ServerSettings(dsn=pg_dsn, verifier=TokenVerifier(SECRET),
                                          tmp_dir=str(cache_parent)))
    headers = {"authorization": f"Bearer {issue_token(SECRET, ['A'], ttl=600)}"}
    try:
        sources = []
        for n, change in enumerate([None, doc("1", "A", "quarterly report"), None]):
            if change is not None:
                writer.apply([change], deletes=[("note", "2", "leaf")])
            r = httpx.get(f"{server.url}/v1/snapshot", params={"partition": "A", "spaces": "local"},
                          headers=headers, timeout=30)
            assert r.status_code == 200
            sources.append(r.headers[SOURCE_HEADER])
            assert int(r.headers[CURSOR_HEADER]) == last_seq(pg_dsn)
            path = tmp_path / f"{n}.db"
            path.write_bytes(r.content)
            assert_current(pg_dsn, path, ["A"], ["local"], tmp_path)
        assert sources == ["export", "caught_up", "cached"]
        assert len(list(cache_parent.iterdir())) == 1
    finally:
        server.stop()
    assert not list(cache_parent.iterdir())


def test_files_served_while_a_writer_commits_continue_exactly_from_their_cursors(
        writer, pg_dsn, cache, tmp_path, monkeypatch):
    """Each served file, exported or brought forward while another session commits, is a
    consistent state at its cursor: a device that applies the pages after that cursor
    ends equal to the server (the test's writers stop first)."""
    import random

    from slipstream.shardsync.shard import open_shard

    from .shardsync_helpers import LogWriter, pull, random_doc

    monkeypatch.setattr(cache_mod, "PAGE_LIMIT", 7)  # catch-ups read several pages
    writer.apply([doc(str(i), "AB"[i % 2], text(i)) for i in range(60)])
    stop = threading.Event()
    errors: list[BaseException] = []

    def write(seed: int) -> None:
        rng = random.Random(seed)
        w = LogWriter(pg_dsn)
        try:
            while not stop.is_set():
                ids = [str(rng.randrange(80)) for _ in range(rng.randint(1, 4))]
                upserts = [random_doc(rng, i, ["A", "B"]) for i in dict.fromkeys(ids)]
                deletes = [(d.object_type, d.object_id, d.node_kind) for d in upserts[:1]
                           if rng.random() < 0.2]
                w.apply([d for d in upserts if (d.object_type, d.object_id, d.node_kind)
                         not in deletes], deletes=deletes)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            w.close()

    # One writing session, as the worker is one (the log's seq is assigned per writer).
    writers = [threading.Thread(target=write, args=(n,)) for n in range(1)]
    for t in writers:
        t.start()
    served_files = []
    try:
        for n in range(8):
            snap = cache.snapshot(["A"], ["local"])
            served_files.append((snap.source, served(snap, tmp_path, f"{n}.db")))
    finally:
        stop.set()
        for t in writers:
            t.join(30)
    assert not errors
    assert {s for s, _ in served_files} >= {"export", "caught_up"}
    expected = server_state(pg_dsn, ["A"], ["local"])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for _, path in served_files:
            shard = open_shard(path)
            try:
                pull(shard, conn, ["A"], 5)
            finally:
                shard.close()
            assert shard_state(str(path)) == expected
