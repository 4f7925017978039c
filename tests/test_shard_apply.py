"""Applying pages into a shard: exact copies of the server's partitions, one transaction per
page, idempotent, never half-applied, and a clear error for a shard of another format."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import textwrap

import psycopg
import pytest
from slipstream.index import HashingEmbedder, IndexDoc, SearchIndex, SQLiteBackend
from slipstream.index.errors import DimensionMismatchError, ValidationError
from slipstream.shardsync import shard as shard_module
from slipstream.shardsync.errors import ShardFormatError
from slipstream.shardsync.export import export_shard
from slipstream.shardsync.reader import Page, ShardRow, Tombstone, changes_since
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
    summary,
)


def sync(shard: SQLiteBackend, dsn: str, partitions, limit: int = 5) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return pull(shard, conn, partitions, limit)


def exported(dsn: str, partitions, path) -> SQLiteBackend:
    with psycopg.connect(dsn, autocommit=True) as conn:
        export_shard(conn, "slipstream", partitions, path, spaces=["local"])
    return open_shard(path)


def random_round(rng: random.Random, writer: LogWriter, partitions) -> None:
    ids = [str(i) for i in range(40)]
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.7:
            writer.apply([random_doc(rng, i, partitions) for i in rng.sample(ids, rng.randint(1, 8))])
        else:
            writer.apply(deletes=[(t, i, n) for i in rng.sample(ids, 3)
                                  for t in ("note", "task") for n in ("leaf", "chunk")])


@pytest.mark.parametrize("partitions", [["A"], ["A", "B"]])
def test_a_synced_shard_equals_the_server_and_ranks_identically(
        writer: LogWriter, pg_dsn: str, tmp_path, partitions) -> None:
    rng = random.Random(len(partitions))
    everywhere = ["A", "B", "C"]
    writer.apply([random_doc(rng, str(i), everywhere) for i in range(40)])
    shard = exported(pg_dsn, partitions, tmp_path / "s.db")
    device = SearchIndex(shard, HashingEmbedder(DIM))
    device.search("apple", partition=partitions)  # load the search cache before syncing
    for _ in range(8):
        random_round(rng, writer, everywhere)  # updates, moves in and out, deletes
        sync(shard, pg_dsn, partitions)
        assert shard_rows(shard) == server_rows(pg_dsn, partitions, ["local"])
        assert_same_search(writer.index, device, partitions)
    # The incrementally updated cache ranks as a fresh load of the file does.
    fresh = SearchIndex(SQLiteBackend(tmp_path / "s.db"), HashingEmbedder(DIM))
    for text in ("apple banana", "quarterly report", "paris"):
        assert summary(device.search(text, partition=partitions)) == \
            summary(fresh.search(text, partition=partitions))


def test_moves_across_pages_reach_the_device(writer: LogWriter, pg_dsn: str, tmp_path) -> None:
    writer.apply([doc("m", "A", "mover"), doc("x", "A", "stays")])
    a, b = exported(pg_dsn, ["A"], tmp_path / "a.db"), exported(pg_dsn, ["B"], tmp_path / "b.db")
    writer.apply([doc("m", "B", "mover moved")])
    writer.apply([doc("y", "A", "later")])
    # Page size 1: the move's d lands on a later page than its u.
    assert sync(a, pg_dsn, ["A"], limit=1) >= 2
    assert sync(b, pg_dsn, ["B"], limit=1) >= 1
    assert set(shard_rows(a)) == {("note", "x", "leaf"), ("note", "y", "leaf")}
    assert a.get("note", "m")["deleted"] == 1
    assert shard_rows(b) == server_rows(pg_dsn, ["B"], ["local"])
    assert set(shard_rows(b)) == {("note", "m", "leaf")}
    found = SearchIndex(a, HashingEmbedder(DIM)).search("mover", partition="A")
    assert [r.key for r in found if r.lexical_rank] == []


def test_applying_a_page_again_changes_nothing(writer: LogWriter, pg_dsn: str, tmp_path) -> None:
    writer.apply([doc("1", "A", "apple")])
    shard = exported(pg_dsn, ["A"], tmp_path / "a.db")
    start = shard_cursor(shard)
    writer.apply([doc("1", "A", "apple pie"), doc("2", "A", "pear")])
    writer.apply(deletes=[("note", "2", "leaf")])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        page = changes_since(conn, "slipstream", ["A"], start, 100, ["local"])
    assert apply_page(shard, page) == page.next_cursor > start
    rows, generation = shard_rows(shard), shard.meta("generation")
    assert apply_page(shard, page) == page.next_cursor
    assert shard_rows(shard) == rows and shard.meta("generation") == generation
    # A page that overlaps the shard's cursor (read from further back) also applies cleanly.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        writer.apply([doc("3", "A", "plum")])
        overlap = changes_since(conn, "slipstream", ["A"], start, 100, ["local"])
    apply_page(shard, overlap)
    assert shard_rows(shard) == server_rows(pg_dsn, ["A"], ["local"])


def test_updates_keep_the_text_index_exact_whether_the_terms_changed_or_not(
        writer: LogWriter, pg_dsn: str, tmp_path) -> None:
    writer.apply([doc("1", "A", "apple"), doc("2", "A", "pear"), doc("3", "A", "plum")])
    shard = exported(pg_dsn, ["A"], tmp_path / "a.db")
    index = SearchIndex(shard, HashingEmbedder(DIM))
    assert {r.key[1] for r in index.search("plum", partition="A", mode="precision")} == {"3"}
    writer.apply([doc("1", "A", "apple", payload={"v": 2}),  # same terms, new payload
                  doc("2", "A", "quince"),                   # new terms
                  IndexDoc("note", "3", "leaf", title="", body="", partition="A")])  # no terms
    sync(shard, pg_dsn, ["A"])
    assert shard_rows(shard) == server_rows(pg_dsn, ["A"], ["local"])  # checks the FTS rows
    shard.connection.execute("INSERT INTO docs_fts (docs_fts) VALUES ('integrity-check')")
    assert shard.connection.execute("SELECT count(*) FROM docs_fts").fetchone() == (2,)
    hits = lambda q: {r.key[1] for r in index.search(q, partition="A", mode="precision")}
    assert hits("apple") == {"1"} and hits("quince") == {"2"}
    assert hits("pear") == set() and hits("plum") == set()
    assert [r.payload for r in index.search("apple", partition="A", mode="precision")] == [{"v": 2}]
    shard.close()


def test_bad_pages_are_refused_before_anything_is_written(writer: LogWriter, pg_dsn: str,
                                                         tmp_path) -> None:
    writer.apply([doc("1", "A", "apple")])
    shard = exported(pg_dsn, ["A"], tmp_path / "a.db")
    cursor, rows = shard_cursor(shard), shard_rows(shard)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        writer.apply([doc("2", "A", "pear"), doc("3", "B", "plum")])
        good = changes_since(conn, "slipstream", ["A"], cursor, 100, ["local"])
        other = changes_since(conn, "slipstream", ["B"], cursor, 100, ["local"])
    row = good.entries[0]
    assert isinstance(row, ShardRow)
    bad_pages = [
        Page(good.entries, good.next_cursor, False, since=cursor + 1),  # a gap
        Page(good.entries + other.entries, good.next_cursor, False, cursor),  # partition B
        Page((Tombstone(row.key, "B"),), good.next_cursor, False, cursor),
        Page((ShardRow(**{**_fields(row), "vectors": {"local": b"\0" * 8}}),), good.next_cursor, False),
        Page((ShardRow(**{**_fields(row), "vectors": {"server": b"\0" * 96}}),), good.next_cursor, False),
    ]
    for page in bad_pages:
        with pytest.raises(ValidationError):
            apply_page(shard, page)
        assert shard_cursor(shard) == cursor and shard_rows(shard) == rows
    with pytest.raises(DimensionMismatchError):
        apply_page(shard, bad_pages[3])
    apply_page(shard, good)
    assert shard_rows(shard) == server_rows(pg_dsn, ["A"], ["local"])


def _fields(row: ShardRow) -> dict:
    return {name: getattr(row, name) for name in ShardRow.__slots__}


def test_an_error_mid_page_rolls_the_whole_page_back(writer: LogWriter, pg_dsn: str, tmp_path,
                                                     monkeypatch) -> None:
    writer.apply([doc(str(i), "A", "apple") for i in range(10)])
    shard = exported(pg_dsn, ["A"], tmp_path / "a.db")
    device = SearchIndex(shard, HashingEmbedder(DIM))
    before_rows, before_cursor = shard_rows(shard), shard_cursor(shard)
    before = summary(device.search("apple", partition="A"))
    writer.apply([doc(str(i), "A", "banana") for i in range(10)])
    writer.apply(deletes=[("note", "9", "leaf")])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        page = changes_since(conn, "slipstream", ["A"], before_cursor, 100, ["local"])
    calls = []
    real = shard_module._upsert

    def failing(c, row, now):
        calls.append(row.key)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(c, row, now)

    monkeypatch.setattr(shard_module, "_upsert", failing)
    with pytest.raises(OSError):
        apply_page(shard, page)
    assert shard_cursor(shard) == before_cursor and shard_rows(shard) == before_rows
    assert summary(device.search("apple", partition="A")) == before
    monkeypatch.setattr(shard_module, "_upsert", real)
    apply_page(shard, page)
    assert shard_rows(shard) == server_rows(pg_dsn, ["A"], ["local"])
    assert [r.key for r in device.search("apple", partition="A") if r.lexical_rank] == []
    assert len([r for r in device.search("banana", partition="A") if r.lexical_rank]) == 9


CRASHING_APPLY = textwrap.dedent("""
    import os, sys
    import psycopg
    from slipstream.shardsync import shard as m
    from slipstream.shardsync.reader import changes_since
    dsn, path = sys.argv[1], sys.argv[2]
    shard = m.open_shard(path)
    with psycopg.connect(dsn, autocommit=True) as conn:
        page = changes_since(conn, "slipstream", ["A"], m.shard_cursor(shard), 1000, ["local"])
    real, calls = m._upsert, []
    def dying(c, row, now):
        calls.append(1)
        if len(calls) == 50:
            os._exit(17)  # the process dies mid-transaction, nothing cleaned up
        return real(c, row, now)
    m._upsert = dying
    m.apply_page(shard, page)
""")


def test_a_process_killed_mid_page_leaves_the_shard_at_its_previous_cursor(
        writer: LogWriter, pg_dsn: str, tmp_path) -> None:
    writer.apply([doc(str(i), "A", "apple") for i in range(100)])
    path = tmp_path / "a.db"
    shard = exported(pg_dsn, ["A"], path)
    before_rows, before_cursor = shard_rows(shard), shard_cursor(shard)
    before = summary(SearchIndex(shard, HashingEmbedder(DIM)).search("apple", partition="A", k=20))
    shard.close()
    writer.apply([doc(str(i), "A", "banana") for i in range(100)])
    done = subprocess.run([sys.executable, "-c", CRASHING_APPLY, pg_dsn, str(path)],
                          check=False, timeout=120)
    assert done.returncode == 17
    shard = open_shard(path)
    assert shard_cursor(shard) == before_cursor and shard_rows(shard) == before_rows
    device = SearchIndex(shard, HashingEmbedder(DIM))
    assert summary(device.search("apple", partition="A", k=20)) == before
    sync(shard, pg_dsn, ["A"], limit=1000)  # the next run completes
    assert shard_rows(shard) == server_rows(pg_dsn, ["A"], ["local"])


@pytest.mark.parametrize("key,value,message", [
    ("format_version", "2", "format_version '2'"),
    ("analyzer", "en-9", "'en-9'"),
])
def test_a_shard_of_another_format_is_refused_untouched(tmp_path, key, value, message) -> None:
    path = tmp_path / "s.db"
    SQLiteBackend(path, spaces={"local": DIM}).close()
    with sqlite3.connect(path) as c:
        c.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
    before = path.read_bytes()
    with pytest.raises(ShardFormatError, match=message) as info:
        open_shard(path)
    assert "export" in str(info.value).lower()
    assert path.read_bytes() == before


def test_a_file_that_is_not_a_shard_is_refused(tmp_path) -> None:
    with pytest.raises(ShardFormatError, match="no shard"):
        open_shard(tmp_path / "missing.db")
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(ShardFormatError, match="not a slipstream shard"):
        open_shard(tmp_path / "junk.db")
    sqlite3.connect(tmp_path / "empty.db").execute("CREATE TABLE x (y)").connection.close()
    with pytest.raises(ShardFormatError):
        open_shard(tmp_path / "empty.db")


def test_the_device_side_needs_no_database_driver() -> None:
    probe = ("import sys; import slipstream.shardsync; from slipstream.shardsync import shard, entries; "
             "bad = [m for m in sys.modules if m.startswith(('psycopg', 'slipstream.worker'))]; "
             "assert not bad, bad")
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)
