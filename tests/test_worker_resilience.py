"""The stream survives a cut link, and idle published tables do not pin WAL (guarantee 2)."""

from __future__ import annotations

import time

import psycopg
from slipstream.worker.lsn import parse_lsn

from .proxy import Proxy
from .worker_harness import NOTES_DDL, Harness


def test_connection_cut_mid_stream_reconnects_and_loses_nothing(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(NOTES_DDL)
    with Proxy.for_dsn(pg_dsn) as proxy:
        harness = Harness(pg_dsn, source_dsn=proxy.dsn(pg_dsn))
        harness.setup()
        harness.start()
        try:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                for i in range(60):
                    conn.execute("INSERT INTO notes (owner, title) VALUES ('alice', %s)", (f"row{i}",))
                    if i in (15, 40):
                        proxy.cut()
                    time.sleep(0.01)
            harness.wait_caught_up(timeout=60)
            assert sum(1 for e, _ in harness.events if e == 'reconnecting') >= 2
        finally:
            harness.close()
    with psycopg.connect(pg_dsn) as conn:
        live = conn.execute("SELECT count(*) FROM slipstream.docs WHERE NOT deleted").fetchone()[0]
        logged = conn.execute("SELECT count(DISTINCT object_id) FROM slipstream.changes").fetchone()[0]
    assert live == 60 and logged == 60


def slot_lag(conn: psycopg.Connection) -> int:
    (lag,) = conn.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), confirmed_flush_lsn)::bigint "
        "FROM pg_replication_slots WHERE slot_name = 'slipstream'").fetchone()
    return int(lag)


def test_idle_published_tables_do_not_pin_wal(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(NOTES_DDL)
        conn.execute("CREATE TABLE unpublished (id bigserial PRIMARY KEY, junk text)")
        conn.execute("ALTER TABLE unpublished ALTER COLUMN junk SET STORAGE EXTERNAL")  # no compression
    harness = Harness(pg_dsn)
    harness.setup()
    harness.start()
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            (start,) = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            for _ in range(25):  # 25 x 2 MB of WAL that the slot's publication never sees
                conn.execute("INSERT INTO unpublished (junk) "
                             "SELECT repeat(md5(g::text), 64) FROM generate_series(1, 1000) g")
            (end,) = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            assert parse_lsn(end) - parse_lsn(start) > 50 * 1024 * 1024
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and slot_lag(conn) > 1024 * 1024:
                time.sleep(0.2)
            lag = slot_lag(conn)
        assert lag <= 1024 * 1024, f"slot still {lag} bytes behind after 20 s"
        assert harness.runner.flushed >= parse_lsn(end) - 1024 * 1024
    finally:
        harness.close()


def checkpoint_lsn(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT lsn::text FROM slipstream.checkpoints").fetchone()
    return parse_lsn(row[0]) if row else 0


def test_heartbeat_moves_the_checkpoint_while_tables_are_idle(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(NOTES_DDL)
    harness = Harness(pg_dsn, heartbeat_seconds=0.2)
    harness.setup()
    harness.start()
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO notes (owner, title) VALUES ('alice', 'one')")
        harness.wait_caught_up()
        first = checkpoint_lsn(pg_dsn)
        deadline = time.monotonic() + 10
        while checkpoint_lsn(pg_dsn) <= first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert checkpoint_lsn(pg_dsn) > first  # heartbeat transactions, no app writes
    finally:
        harness.close()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM slipstream.changes").fetchone()[0] == 1


def test_a_slot_held_by_another_process_is_retried_until_free(pg_dsn: str) -> None:
    from slipstream.worker.replication import ReplicationConnection

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(NOTES_DDL)
    harness = Harness(pg_dsn)
    harness.setup()
    holder = ReplicationConnection.connect(pg_dsn)
    holder.start_replication("slipstream", publication_names=["slipstream"])
    harness.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(e == "reconnecting" for e, _ in harness.events):
            time.sleep(0.05)
        reasons = [kw["reason"] for e, kw in harness.events if e == "reconnecting"]
        assert reasons and "active" in reasons[0], reasons
        holder.close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO notes (owner, title) VALUES ('alice', 'after release')")
        harness.wait_caught_up(timeout=30)
        assert [r.object_id for r in harness.index.search("release", partition="alice")] == ["1"]
    finally:
        holder.close()
        harness.close()
