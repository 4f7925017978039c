"""The change-log reader: pages in seq order, current content, tombstones for deletes and moves."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from slipstream.index.errors import UnknownSpaceError, ValidationError
from slipstream.shardsync.changelog import ChangeLog
from slipstream.shardsync.errors import ResyncRequired
from slipstream.shardsync.reader import Page, ShardRow, Tombstone, changes_since

from .shardsync_helpers import LogWriter, doc


@pytest.fixture
def conn(pg_dsn: str):
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        yield c


def read_all(conn, partitions, cursor=0, limit=1000, spaces=None) -> tuple[list[Page], int]:
    pages = []
    while True:
        page = changes_since(conn, "slipstream", partitions, cursor, limit, spaces)
        pages.append(page)
        assert page.next_cursor >= cursor
        cursor = page.next_cursor
        if not page.has_more:
            return pages, cursor


def test_pages_come_in_seq_order_with_the_current_content(writer: LogWriter, conn) -> None:
    seqs = [writer.apply([doc(str(i), "A", f"apple {i}")]) for i in range(7)]
    writer.apply([doc("b", "B", "banana")])
    writer.apply([doc("3", "A", "cherry updated")])
    pages, cursor = read_all(conn, ["A"], limit=3, spaces=["local"])
    assert [len(p.entries) for p in pages] == [3, 3, 2]
    assert [p.has_more for p in pages] == [True, True, False]
    assert pages[0].next_cursor == seqs[2] and pages[0].since == 0
    assert cursor == 9  # the last seq in the log, although it is B's
    keys = [e.key[1] for p in pages for e in p.entries]
    assert keys == ["0", "1", "2", "3", "4", "5", "6", "3"]  # "3" again at its update
    row = pages[-1].entries[-1]
    assert pages[1].entries[0] == row  # both carry the current content
    assert isinstance(row, ShardRow) and row.partition == "A"
    stored = writer.backend.get("note", "3")
    assert row.title == stored["title"] == "title 3 cherry updated"
    assert row.tf == {t: tuple(v) for t, v in stored["tf"].items()}
    assert (row.len_title, row.len_body) == (stored["len_title"], stored["len_body"])
    assert set(row.vectors) == {"local"}  # only the requested space
    assert np.array_equal(np.frombuffer(row.vectors["local"], "<f4"), stored["vectors"]["local"])
    assert all(e.partition == "A" for p in pages for e in p.entries)  # nothing of B
    assert changes_since(conn, "slipstream", ["A"], cursor).entries == ()


def test_no_spaces_means_no_vectors_and_both_spaces_come_when_asked(writer: LogWriter, conn) -> None:
    writer.apply([doc("1", "A", "apple pie")])
    (row,) = changes_since(conn, "slipstream", "A", 0, spaces=()).entries
    assert row.vectors == {}
    for spaces in (["server", "local"], None):
        (row,) = changes_since(conn, "slipstream", "A", 0, spaces=spaces).entries
        assert {s: len(v) for s, v in row.vectors.items()} == {"server": 24 * 4, "local": 16 * 4}
    with pytest.raises(UnknownSpaceError):
        changes_since(conn, "slipstream", "A", 0, spaces=["nope"])


def test_only_spaces_the_server_lists_are_read_not_any_column(writer: LogWriter, conn) -> None:
    """A space name is checked against the spaces table: a column of the same shape (a
    re-embedding's shadow column, say) is not a space, and the page says so."""
    writer.apply([doc("1", "A", "apple pie")])
    conn.execute("ALTER TABLE slipstream.docs ADD COLUMN emb_ghost vector(4)")
    for spaces in (["ghost"], ["local", "nope"]):
        with pytest.raises(UnknownSpaceError, match="are not in slipstream.docs"):
            changes_since(conn, "slipstream", "A", 0, spaces=spaces)
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    (row,) = changes_since(conn, "slipstream", "A", 0, spaces=["local"]).entries
    assert set(row.vectors) == {"local"}


def test_a_delete_is_a_tombstone(writer: LogWriter, conn) -> None:
    writer.apply([doc("1", "A", "apple"), doc("2", "A", "pear")])
    cursor = changes_since(conn, "slipstream", "A", 0).next_cursor
    writer.apply(deletes=[("note", "1", "leaf")])
    page = changes_since(conn, "slipstream", "A", cursor)
    assert page.entries == (Tombstone(("note", "1", "leaf"), "A"),)
    # Read from the start, the deleted row never comes as an upsert.
    page = changes_since(conn, "slipstream", "A", 0)
    assert [type(e) for e in page.entries] == [ShardRow, Tombstone]
    assert page.entries[1] == Tombstone(("note", "1", "leaf"), "A")


def test_a_move_tombstones_the_old_partition_even_when_the_d_is_on_a_later_page(
        writer: LogWriter, conn) -> None:
    writer.apply([doc("m", "A", "mover")])
    writer.apply([doc("x", "A", "stays")])
    writer.apply([doc("m", "B", "mover moved")])  # logs d in A, then u in B
    # A's first page holds only m's u entry; the d is on the next page.
    first = changes_since(conn, "slipstream", "A", 0, limit=1)
    assert first.has_more and first.entries == (Tombstone(("note", "m", "leaf"), "A"),)
    pages, _ = read_all(conn, ["A"], limit=1)
    final = {e.key[1]: e for p in pages for e in p.entries}
    assert isinstance(final["m"], Tombstone) and isinstance(final["x"], ShardRow)
    (b,) = changes_since(conn, "slipstream", "B", 0).entries
    assert isinstance(b, ShardRow) and b.partition == "B" and b.title == "title m mover moved"
    # A device holding both partitions gets the tombstone for A before the upsert into B.
    both = changes_since(conn, "slipstream", ["A", "B"], 0).entries
    assert [(type(e).__name__, e.key[1], e.partition) for e in both] == [
        ("ShardRow", "x", "A"), ("Tombstone", "m", "A"), ("ShardRow", "m", "B")]


def test_a_cursor_below_the_horizon_must_resync(writer: LogWriter, conn) -> None:
    for i in range(3):
        writer.apply([doc(str(i), "A")])
    with conn.transaction():
        ChangeLog().raise_horizon(conn, 2)
    with pytest.raises(ResyncRequired) as info:
        changes_since(conn, "slipstream", "A", 1)
    assert (info.value.cursor, info.value.horizon) == (1, 2)
    assert "snapshot" in str(info.value)
    assert [e.key[1] for e in changes_since(conn, "slipstream", "A", 2).entries] == ["2"]


@pytest.mark.parametrize("bad", [
    {"partitions": []}, {"partitions": [""]}, {"cursor": -1}, {"cursor": "3"},
    {"limit": 0}, {"limit": 10**9},
])
def test_bad_arguments_raise_validation_errors(writer: LogWriter, conn, bad) -> None:
    args = {"partitions": ["A"], "cursor": 0, "limit": 10} | bad
    with pytest.raises(ValidationError):
        changes_since(conn, "slipstream", args["partitions"], args["cursor"], args["limit"])


def test_a_connection_inside_a_transaction_is_refused(writer: LogWriter, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as c:
        c.execute("SELECT 1")
        with pytest.raises(ValidationError, match="no open transaction"):
            changes_since(c, "slipstream", "A", 0)
        c.rollback()  # idle, not autocommit: each page is read in a transaction of its own
        writer.apply([doc("1", "A", "apple")])
        for _ in range(2):
            assert [e.key[1] for e in changes_since(c, "slipstream", "A", 0).entries] == ["1"]
            assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


@pytest.mark.parametrize("n", [3, 80])
def test_the_async_driver_reads_the_same_page_as_the_blocking_one(writer: LogWriter, conn,
                                                                 pg_dsn: str, n: int) -> None:
    """Small pages are assembled on the event loop, large ones in a thread: same page."""
    import asyncio

    from slipstream.shardsync import reader

    writer.apply([doc(str(i), "AB"[i % 2], "apple pear") for i in range(n)])
    writer.apply(deletes=[("note", "0", "leaf")])

    async def read(spaces):
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as aconn:
            return await reader.read_page_async(aconn, "slipstream", ["A"], 0, 1000, spaces)

    for spaces in (["local"], None):
        got = asyncio.run(read(spaces))
        assert got == reader.read_page(conn, "slipstream", ["A"], 0, 1000, spaces)
        assert len(got.page.entries) == (n + 1) // 2 and got.end == got.page.next_cursor
    assert (n + 2 > reader.INLINE_ROWS) == (n == 80)  # ~n + 2 rows: both paths are taken
