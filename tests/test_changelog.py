"""The change log: migration (new and pre-existing databases), append + NOTIFY, the one-slot claim."""

from __future__ import annotations

import psycopg
import pytest
from slipstream.shardsync.changelog import COPY_MIN_ROWS, ChangeEntry, ChangeLog, channel_name
from slipstream.shardsync.errors import SlotConflictError
from slipstream.worker.state import WorkerState

OLD_WORKER_DDL = """
CREATE SCHEMA slipstream;
CREATE TABLE slipstream.worker_migrations (version integer PRIMARY KEY, name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now());
INSERT INTO slipstream.worker_migrations (version, name) VALUES (1, 'worker state');
CREATE TABLE slipstream.checkpoints (slot text PRIMARY KEY, lsn pg_lsn NOT NULL DEFAULT '0/0',
    partial_lsn pg_lsn, partial_offset integer NOT NULL DEFAULT 0,
    last_seq bigint NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE slipstream.changes (seq bigint PRIMARY KEY, partition text NOT NULL,
    object_type text NOT NULL, object_id text NOT NULL, node_kind text NOT NULL,
    op char(1) NOT NULL CHECK (op IN ('u', 'd')), source_lsn pg_lsn,
    recorded_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX changes_partition_seq ON slipstream.changes (partition, seq);
CREATE TABLE slipstream.source_rows (relation text NOT NULL, row_key text NOT NULL,
    row_values jsonb, docs jsonb NOT NULL DEFAULT '[]', lsn pg_lsn NOT NULL,
    deleted boolean NOT NULL DEFAULT false, PRIMARY KEY (relation, row_key));
CREATE TABLE slipstream.dead_letters (id bigserial PRIMARY KEY, source_lsn pg_lsn,
    relation text NOT NULL, row_key text, op text NOT NULL, row_values jsonb, error text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(), retried_at timestamptz, resolved_at timestamptz);
CREATE INDEX dead_letters_open ON slipstream.dead_letters (id) WHERE resolved_at IS NULL;
CREATE TABLE slipstream.snapshot_progress (relation text PRIMARY KEY, last_key jsonb,
    rows_copied bigint NOT NULL DEFAULT 0, read_lsn pg_lsn, done boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now());
INSERT INTO slipstream.changes (seq, partition, object_type, object_id, node_kind, op)
    VALUES (1, 'A', 'note', '1', 'leaf', 'u'), (2, 'A', 'note', '2', 'leaf', 'u');
"""


def entries(n: int, partition: str = "A") -> list[ChangeEntry]:
    return [ChangeEntry(partition, "note", str(i), "leaf", "u", 0x10) for i in range(n)]


def test_worker_migration_creates_the_log_through_the_changelog_module(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        WorkerState().migrate(conn)
        WorkerState().migrate(conn)  # idempotent
        names = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'slipstream'")}
        assert {"changes", "changelog_writer", "changelog_horizon", "checkpoints"} <= names
        (versions,) = conn.execute("SELECT array_agg(version) FROM slipstream.changelog_migrations").fetchone()
        assert versions == [1]


def test_a_database_made_before_the_move_keeps_its_log(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(OLD_WORKER_DDL)
        conn.commit()
        WorkerState().migrate(conn)
        log = ChangeLog()
        assert log.max_seq(conn) == 2
        with conn.transaction():
            assert log.append(conn, entries(3)) == 5
        assert [r[0] for r in conn.execute("SELECT seq FROM slipstream.changes ORDER BY seq")] == \
            [1, 2, 3, 4, 5]


@pytest.mark.parametrize("n", [3, COPY_MIN_ROWS + 5])
def test_append_assigns_consecutive_seqs_and_notifies_after_commit(pg_dsn: str, n: int) -> None:
    log = ChangeLog()
    with psycopg.connect(pg_dsn) as conn, psycopg.connect(pg_dsn, autocommit=True) as listener:
        log.migrate(conn)
        listener.execute(f"LISTEN {log.channel}")
        with conn.transaction():
            assert log.append(conn, entries(2)) == 2
        assert [n.payload for n in listener.notifies(timeout=2, stop_after=1)] == ["2"]
        with conn.transaction():
            last = log.append(conn, entries(n, "B"), first_seq=3)
            assert last == 2 + n
            assert list(listener.notifies(timeout=0.2, stop_after=1)) == []  # not before commit
        got = [note.payload for note in listener.notifies(timeout=2, stop_after=1)]
        assert got == [str(2 + n)]
        rows = conn.execute("SELECT seq, partition, object_id, op FROM slipstream.changes "
                            "WHERE partition = 'B' ORDER BY seq").fetchall()
        assert [r[0] for r in rows] == list(range(3, 3 + n))
        assert [r[2] for r in rows] == [str(i) for i in range(n)]
        with conn.transaction():
            assert log.append(conn, []) == log.max_seq(conn)


def test_channel_names_fit_postgres_identifiers() -> None:
    assert channel_name("slipstream") == "slipstream_changes_slipstream"
    long = channel_name("s" * 63)
    assert len(long) <= 63 and long != channel_name("t" * 63)


def test_one_slot_per_schema(pg_dsn: str) -> None:
    state = WorkerState()
    with psycopg.connect(pg_dsn) as conn:
        state.migrate(conn)
        state.claim_writer(conn, "slot_a")
        conn.commit()
        state.claim_writer(conn, "slot_a")  # the same slot again (a restart) is fine
        conn.commit()
    with psycopg.connect(pg_dsn) as other:
        with pytest.raises(SlotConflictError) as info:
            ChangeLog().claim(other, "slot_b")
        assert "slot_a" in str(info.value) and "slot_b" in str(info.value)
        assert ChangeLog().writer(other) == "slot_a"
        other.rollback()
        assert ChangeLog().release(other, "slot_a")
        ChangeLog().claim(other, "slot_b")
        other.commit()
        assert ChangeLog().writer(other) == "slot_b"


def test_max_seq_never_falls_below_the_horizon(pg_dsn: str) -> None:
    log = ChangeLog()
    with psycopg.connect(pg_dsn) as conn:
        log.migrate(conn)
        with conn.transaction():
            log.append(conn, entries(4))
            assert log.raise_horizon(conn, 4) == 4
            assert log.raise_horizon(conn, 2) == 4  # never down
            conn.execute("DELETE FROM slipstream.changes")
        assert log.max_seq(conn) == 4 and log.horizon(conn) == 4
        with conn.transaction():
            assert log.append(conn, entries(1)) == 5
