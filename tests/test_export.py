"""Shard export: one snapshot, the server's terms and only the requested spaces, a cursor
that pages continue from, and the same ranking as the server."""

from __future__ import annotations

import random
import sqlite3
import threading

import psycopg
import pytest
from slipstream.index import HashingEmbedder, SearchIndex
from slipstream.index.errors import UnknownSpaceError
from slipstream.shardsync.export import export_shard
from slipstream.shardsync.reader import changes_since
from slipstream.shardsync.shard import apply_page, open_shard, shard_cursor, shard_partitions

from .shardsync_helpers import (
    DIM,
    LogWriter,
    assert_same_search,
    doc,
    random_doc,
    server_rows,
    shard_rows,
)
from .shardsync_helpers import doc as doc_


def test_export_carries_the_partition_as_the_server_stores_it(writer: LogWriter, pg_dsn: str,
                                                             tmp_path) -> None:
    rng = random.Random(7)
    writer.apply([random_doc(rng, str(i), ["A", "B"]) for i in range(80)])
    writer.apply([random_doc(rng, str(i), ["A", "B"]) for i in range(0, 80, 3)])  # updates, moves
    last = writer.apply(deletes=[("note", str(i), "leaf") for i in range(0, 80, 7)]
                        + [("task", str(i), "leaf") for i in range(0, 80, 7)])
    path = tmp_path / "a.db"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        cursor = export_shard(conn, "slipstream", ["A"], path, spaces=["local"])
    assert cursor == last
    assert not [p for p in tmp_path.iterdir() if p.name != "a.db"]  # no temporary file left
    shard = open_shard(path)
    assert shard_cursor(shard) == cursor and shard_partitions(shard) == ("A",)
    assert shard.spaces == {"local": DIM}  # not the server's other space
    expected = server_rows(pg_dsn, ["A"], ["local"])
    assert len(expected) > 20
    assert shard_rows(shard) == expected
    (dead,) = shard.connection.execute("SELECT count(*) FROM docs WHERE deleted = 1").fetchone()
    assert dead == 0
    assert assert_same_search(writer.index, SearchIndex(shard, HashingEmbedder(DIM)), "A") > 50
    shard.close()


def test_a_lexical_only_export_and_several_partitions(writer: LogWriter, pg_dsn: str, tmp_path) -> None:
    writer.apply([doc("1", "A", "apple"), doc("2", "B", "banana"), doc("3", "C", "cherry")])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        export_shard(conn, "slipstream", ["B", "A"], tmp_path / "ab.db", spaces=())
        with pytest.raises(UnknownSpaceError):
            export_shard(conn, "slipstream", ["A"], tmp_path / "x.db", spaces=["nope"])
    assert not (tmp_path / "x.db").exists()
    shard = open_shard(tmp_path / "ab.db")
    assert shard.spaces == {} and shard_partitions(shard) == ("A", "B")
    assert {k[1] for k in shard_rows(shard)} == {"1", "2"}
    (n,) = shard.connection.execute("SELECT count(*) FROM vectors").fetchone()
    assert n == 0
    shard.close()


def test_export_replaces_an_existing_file_whole(writer: LogWriter, pg_dsn: str, tmp_path) -> None:
    path = tmp_path / "a.db"
    path.write_bytes(b"an older shard")
    writer.apply([doc("1", "A", "apple")])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        export_shard(conn, "slipstream", "A", path)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert set(shard_rows(open_shard(path))) == {("note", "1", "leaf")}


def test_a_concurrent_writer_never_splits_the_snapshot(writer: LogWriter, pg_dsn: str, tmp_path) -> None:
    """Each write transaction sets rows `a` and `b` to the same version. Whatever moment the
    export's snapshot falls on, both rows carry one version, and the cursor is that
    transaction's last seq; pages from it then bring the shard to the end state."""
    writer.apply([doc(str(i), "A", "filler") for i in range(300)])  # something to stream
    stop = threading.Event()
    versions: dict[int, int] = {}

    def write() -> None:
        w = LogWriter(pg_dsn)
        try:
            v = 0
            while not stop.is_set():
                v += 1
                versions[w.apply([doc("a", "A", f"v{v}"), doc("b", "A", f"v{v}")])] = v
        finally:
            w.close()

    thread = threading.Thread(target=write)
    thread.start()
    try:
        seen = []
        for round_ in range(6):
            path = tmp_path / f"s{round_}.db"
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                cursor = export_shard(conn, "slipstream", ["A"], path, spaces=["local"])
            shard = open_shard(path)
            a, b = shard.get("note", "a"), shard.get("note", "b")
            if a is not None:
                assert a["title"].split()[-1] == b["title"].split()[-1] == f"v{versions[cursor]}"
                seen.append(versions[cursor])
            shard.close()
    finally:
        stop.set()
        thread.join()
    assert len(set(seen)) >= 2  # the snapshots fell between different writes
    shard = open_shard(path)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        while True:
            page = changes_since(conn, "slipstream", ["A"], shard_cursor(shard), 50, ["local"])
            apply_page(shard, page)
            if not page.has_more:
                break
    assert shard_rows(shard) == server_rows(pg_dsn, ["A"], ["local"])
    shard.close()


def test_every_meta_key_of_an_exported_shard_is_documented(writer: LogWriter, pg_dsn: str,
                                                           tmp_path) -> None:
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "shard-format.md").read_text()
    writer.apply([doc_("1", "A", "apple")])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        export_shard(conn, "slipstream", "A", tmp_path / "a.db")
    keys = [k for (k,) in sqlite3.connect(tmp_path / "a.db").execute("SELECT key FROM meta")]
    assert {"cursor", "partitions", "format_version", "analyzer", "generation"} <= set(keys)
    assert all(f"`{k}`" in doc for k in keys)
    page_size = sqlite3.connect(tmp_path / "a.db").execute("PRAGMA page_size").fetchone()[0]
    assert f"{page_size // 1024} KiB pages" in doc


def test_export_streams_with_bounded_memory(writer: LogWriter, pg_dsn: str, tmp_path,
                                            monkeypatch) -> None:
    import tracemalloc

    from slipstream.shardsync import export

    body = " ".join(f"word{i}" for i in range(400))  # ~3.5 KB a row
    for start in range(0, 1500, 500):
        writer.apply([doc_(str(i), "A", body=f"{body} {i}") for i in range(start, start + 500)])
    monkeypatch.setattr(export, "BATCH_ROWS", 25)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        tracemalloc.start()
        try:
            export_shard(conn, "slipstream", ["A"], tmp_path / "a.db", ["local"])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    total = 1500 * len(body)
    assert len(shard_rows(open_shard(tmp_path / "a.db"))) == 1500
    assert peak < total / 2, (peak, total)  # a few batches in memory, never the partition


def test_every_space_bit_for_bit_across_batches_and_rows_without_a_vector(
        writer: LogWriter, pg_dsn: str, tmp_path, monkeypatch) -> None:
    """Vectors are converted a batch at a time: a row without one (pending) in the middle
    of a batch must not shift the others, in either space."""
    from slipstream.shardsync import export

    rng = random.Random(11)
    writer.apply([random_doc(rng, str(i), ["A"]) for i in range(60)])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # as a failed embedding leaves them
        conn.execute("UPDATE slipstream.docs SET emb_local = NULL WHERE object_id IN ('3', '17', '18')")
        conn.execute("UPDATE slipstream.docs SET emb_server = NULL WHERE object_id IN ('17', '40')")
    monkeypatch.setattr(export, "BATCH_ROWS", 7)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        export_shard(conn, "slipstream", ["A"], tmp_path / "a.db")
    shard = open_shard(tmp_path / "a.db")
    assert shard.spaces == {"local": DIM, "server": 24}
    expected = server_rows(pg_dsn, ["A"], ["local", "server"])
    assert shard_rows(shard) == expected
    assert sorted(len(r[-1]) for r in expected.values())[:3] == [0, 1, 1]
    shard.close()


def test_a_failure_while_writing_or_reading_leaves_the_old_shard(writer: LogWriter, pg_dsn: str,
                                                                tmp_path, monkeypatch) -> None:
    from slipstream.shardsync import export

    writer.apply([doc(str(i), "A", "apple") for i in range(30)])
    path = tmp_path / "a.db"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        export_shard(conn, "slipstream", ["A"], path, ["local"])
    before = path.read_bytes()
    writer.apply([doc(str(i), "A", "banana") for i in range(30, 40)])
    monkeypatch.setattr(export, "BATCH_ROWS", 4)
    real = export.vectors_le

    def fail_third(raw, dim, calls=[]):  # noqa: B006 - counts the calls
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("reader failed")
        return real(raw, dim)

    monkeypatch.setattr(export, "vectors_le", fail_third)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        with pytest.raises(RuntimeError, match="reader failed"):
            export_shard(conn, "slipstream", ["A"], path, ["local"])
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    monkeypatch.setattr(export, "vectors_le", real)
    monkeypatch.setattr(export, "_INSERT_FTS", "INSERT INTO no_such_table (rowid, terms) VALUES (?, ?)")
    with (psycopg.connect(pg_dsn, autocommit=True) as conn,
          pytest.raises(sqlite3.OperationalError, match="no_such_table")):
        export_shard(conn, "slipstream", ["A"], path, ["local"])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.db"]  # no temporary file left
    assert not [t for t in threading.enumerate() if t.name == "slipstream-export-writer"]


def test_each_stored_value_is_what_postgres_renders_for_the_row(writer: LogWriter, pg_dsn: str,
                                                                 tmp_path, monkeypatch) -> None:
    """The export reads terms and vectors in binary; every value it stores must still be
    byte for byte what Postgres's own text rendering of the row gives (the JSON columns,
    the tsvector's lexemes in order, the timestamp), for ASCII and non-ASCII terms, rows
    without terms, without a vector, and across batches."""
    import json

    from slipstream.index import IndexDoc, SQLiteBackend
    from slipstream.index.sqlite_backend import fts_token
    from slipstream.shardsync import export
    from slipstream.shardsync.reader import register_vector_bytes

    rng = random.Random(5)
    docs = [random_doc(rng, str(i), ["A"]) for i in range(40)]
    docs += [doc_("u1", "A", "Café naïve STRASSE straße Ελληνικά 東京タワー ①② x9"),
             doc_("u2", "A", "plain words only", keywords=["Zoë", "ﬁne"]),
             IndexDoc("note", "e1", "leaf", title="", body="", partition="A")]  # no terms, no FTS row
    writer.apply(docs)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE slipstream.docs SET emb_local = NULL, pending_spaces = '{local,gone}' "
                     "WHERE object_id IN ('3', 'u1')")
        conn.execute("UPDATE slipstream.docs SET source_updated_at = "
                     "'2025-03-04 05:06:07.089+02' WHERE object_id IN ('2', 'u2')")
        conn.execute("UPDATE slipstream.docs SET source_updated_at = NULL WHERE object_id = '4'")
    monkeypatch.setattr(export, "BATCH_ROWS", 6)
    path = tmp_path / "a.db"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        export_shard(conn, "slipstream", ["A"], path, ["server", "local"])

    spaces = ["server", "local"]
    expected_docs, expected_fts, expected_vecs = {}, {}, {}
    with psycopg.connect(pg_dsn, autocommit=True) as conn, conn.cursor(binary=True) as cur:
        register_vector_bytes(conn, cur)
        cur.execute("SELECT object_type, object_id, node_kind, partition, title, body, keywords::text, "
                    "payload::text, attrs::text, source_updated_at, tf::text, len_title, len_body, "
                    "pending_spaces, array_to_string(tsvector_to_array(tsv), ' '), emb_server, emb_local "
                    "FROM slipstream.docs WHERE partition = 'A' AND NOT deleted")
        for r in cur.fetchall():
            key = tuple(r[:3])
            ts = None if r[9] is None else r[9].isoformat()
            expected_docs[key] = (*r[3:9], ts, r[10], r[11], r[12], 0,
                                  json.dumps([s for s in r[13] if s in spaces]))
            if r[14]:
                expected_fts[key] = " ".join(fts_token(t) for t in r[14].split(" "))
            expected_vecs.update({(key, s): v for s, v in zip(spaces, r[15:]) if v is not None})
    assert any(t.startswith("x") for t in expected_fts[("note", "u1", "leaf")].split())
    assert ("note", "e1", "leaf") not in expected_fts and len(expected_fts) > 40

    shard = sqlite3.connect(path)
    ids = {i: tuple(k) for i, *k in shard.execute(
        "SELECT id, object_type, object_id, node_kind FROM docs")}
    assert sorted(ids) == list(range(1, len(ids) + 1))
    got_docs = {tuple(r[:3]): tuple(r[3:]) for r in shard.execute(
        "SELECT object_type, object_id, node_kind, partition, title, body, keywords, payload, attrs, "
        "source_updated_at, tf, len_title, len_body, deleted, pending_spaces FROM docs")}
    assert got_docs == expected_docs
    assert {ids[i]: t for i, t in shard.execute("SELECT rowid, terms FROM docs_fts")} == expected_fts
    assert {(ids[i], s): v for i, s, v in shard.execute(
        "SELECT doc_id, space, vec FROM vectors")} == expected_vecs
    # The file is the format's: same schema as a new shard, FTS5 settings back at their
    # defaults, the full-text index consistent with its rows.
    SQLiteBackend(tmp_path / "fresh.db", spaces={"local": DIM}).close()
    fresh = sqlite3.connect(tmp_path / "fresh.db")
    for same in ("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name",
                 "SELECT k, v FROM docs_fts_config ORDER BY k"):
        assert shard.execute(same).fetchall() == fresh.execute(same).fetchall()
    fresh.close()
    shard.execute("INSERT INTO docs_fts (docs_fts) VALUES ('integrity-check')")
    assert shard.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    shard.rollback()
    shard.close()
    open_shard(path).close()  # and it opens as a shard of this format
