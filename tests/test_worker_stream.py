"""The worker end to end on a real database: snapshot, stream, tombstones, TOAST, dead letters."""

from __future__ import annotations

import psycopg
import pytest
from slipstream.shardsync.changelog import ChangeLog
from slipstream.worker.lsn import parse_lsn

from .worker_harness import NOTES_DDL, Harness


@pytest.fixture
def app(pg_dsn: str):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(NOTES_DDL)
    harness = Harness(pg_dsn)
    yield harness, pg_dsn
    harness.close()


def run_sql(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in statements:
            conn.execute(s)


def ids(harness: Harness, query: str, partition: str, **kw) -> list[str]:
    return [r.object_id for r in harness.index.search(query, partition=partition, **kw)]


def change_log(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT seq, partition, object_id, op FROM slipstream.changes ORDER BY seq").fetchall()


def test_snapshot_then_stream_insert_update_delete_truncate(app) -> None:
    harness, dsn = app
    run_sql(dsn, "INSERT INTO notes (owner, title, body) VALUES "
                 "('alice', 'quantum entanglement', 'spooky action'), ('bob', 'grocery list', 'apples')")
    report = harness.setup()
    assert report.created_slot and report.copied == {"public.notes": 2}
    assert ids(harness, "quantum", "alice") == ["1"]
    harness.start()
    run_sql(dsn,
            "INSERT INTO notes (owner, title, body) VALUES ('alice', 'quarterly plan', 'budget')",
            "UPDATE notes SET title = 'grocery shopping' WHERE id = 2")
    harness.wait_caught_up()
    assert ids(harness, "quarterly plan", "alice") == ["3"]
    assert ids(harness, "shopping", "bob") == ["2"]

    run_sql(dsn, "DELETE FROM notes WHERE id = 1")
    harness.wait_caught_up()
    assert ids(harness, "quantum", "alice") == []
    assert harness.backend.get("note", "1")["deleted"]

    run_sql(dsn, "UPDATE notes SET owner = 'carol' WHERE id = 3")  # a move between partitions
    harness.wait_caught_up()
    assert ids(harness, "quarterly", "alice") == []
    assert ids(harness, "quarterly", "carol") == ["3"]
    log = change_log(dsn)
    assert (log[-2][1:], log[-1][1:]) == (("alice", "3", "d"), ("carol", "3", "u"))

    run_sql(dsn, "TRUNCATE notes")
    harness.wait_caught_up()
    assert ids(harness, "grocery quarterly", "bob") == [] and ids(harness, "quarterly", "carol") == []
    tail = {(p, i, op) for _, p, i, op in change_log(dsn)[-2:]}
    assert tail == {("bob", "2", "d"), ("carol", "3", "d")}
    seqs = [s for s, *_ in change_log(dsn)]
    assert seqs == list(range(1, len(seqs) + 1))


def test_unchanged_toast_value_keeps_body_and_vector(app) -> None:
    harness, dsn = app
    run_sql(dsn, "ALTER TABLE notes ALTER COLUMN body SET STORAGE EXTERNAL")
    harness.setup()
    harness.start()
    body = " ".join(f"word{i} entanglement" for i in range(1200))  # ~20 KB, stored out of line
    assert len(body) > 10_000
    run_sql(dsn, f"INSERT INTO notes (owner, title, body) VALUES ('alice', 'big', '{body}')")
    harness.wait_caught_up()
    before = harness.backend.get("note", "1")
    run_sql(dsn, "UPDATE notes SET title = 'big renamed' WHERE id = 1")  # body not touched
    harness.wait_caught_up()
    after = harness.backend.get("note", "1")
    assert after["title"] == "big renamed"
    assert after["body"] == body
    assert "local" in after["vectors"]
    assert not (after["vectors"]["local"] == before["vectors"]["local"]).all()  # title changed
    assert ids(harness, "word1199", "alice") == ["1"]


def test_mapper_error_goes_to_dead_letters_and_stream_goes_on(app) -> None:
    harness, dsn = app
    harness.setup()
    harness.start()
    run_sql(dsn, "INSERT INTO notes (owner, title, body) VALUES "
                 "('alice', 'fine one', 'x'), ('alice', 'boom', 'y'), ('alice', 'fine two', 'z')")
    harness.wait_caught_up()
    assert sorted(ids(harness, "fine", "alice")) == ["1", "3"]
    with psycopg.connect(dsn) as conn:
        letters = conn.execute(
            "SELECT relation, op, row_values->>'title', error FROM slipstream.dead_letters").fetchall()
    assert len(letters) == 1
    relation, op, title, error = letters[0]
    assert (relation, op, title) == ("public.notes", "insert", "boom")
    assert "mapper exploded" in error
    run_sql(dsn, "INSERT INTO notes (owner, title, body) VALUES ('alice', 'fine three', 'w')")
    harness.wait_caught_up()
    assert "4" in ids(harness, "fine", "alice")


def test_filtered_out_row_is_tombstoned(app) -> None:
    harness, dsn = app
    harness.setup()
    harness.start()
    run_sql(dsn, "INSERT INTO notes (owner, title) VALUES ('alice', 'secret plan')")
    harness.wait_caught_up()
    assert ids(harness, "secret", "alice") == ["1"]
    run_sql(dsn, "UPDATE notes SET status = 'hidden' WHERE id = 1")
    harness.wait_caught_up()
    assert ids(harness, "secret", "alice") == []
    assert change_log(dsn)[-1][1:] == ("alice", "1", "d")


def test_own_writes_are_not_consumed(app) -> None:
    """The search schema lives in the app database; only the configured table is published."""
    harness, dsn = app
    harness.setup()
    with psycopg.connect(dsn) as conn:
        published = conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables "
            "WHERE pubname = 'slipstream'").fetchall()
    assert published == [("public.notes",)]
    harness.start()
    run_sql(dsn, "INSERT INTO notes (owner, title) VALUES ('alice', 'one')")
    harness.wait_caught_up()
    # Several more rounds: if the worker consumed its own writes it would apply them as changes.
    for i in range(3):
        run_sql(dsn, f"UPDATE notes SET title = 'round {i}' WHERE id = 1")
        harness.wait_caught_up()
    with psycopg.connect(dsn) as conn:
        (n,) = conn.execute("SELECT count(*) FROM slipstream.changes").fetchone()
        relations = conn.execute("SELECT DISTINCT relation FROM slipstream.source_rows").fetchall()
    assert n == 4
    assert relations == [("public.notes",)]


def test_restart_resumes_from_checkpoint_without_reapplying(app) -> None:
    harness, dsn = app
    harness.setup()
    harness.start()
    run_sql(dsn, "INSERT INTO notes (owner, title) VALUES ('alice', 'first')")
    harness.wait_caught_up()
    harness.stop()
    run_sql(dsn, "INSERT INTO notes (owner, title) VALUES ('alice', 'second')")  # while stopped
    harness.start()
    harness.wait_caught_up()
    assert sorted(ids(harness, "first second", "alice")) == ["1", "2"]
    assert [(p, i, op) for _, p, i, op in change_log(dsn)] == [("alice", "1", "u"), ("alice", "2", "u")]
    with psycopg.connect(dsn) as conn:
        (cp,) = conn.execute("SELECT lsn::text FROM slipstream.checkpoints").fetchone()
        (confirmed,) = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots").fetchone()
    assert parse_lsn(confirmed) >= parse_lsn(cp) > 0


def test_replay_at_or_below_the_checkpoint_is_skipped(app) -> None:
    """The window between an apply commit and the flush feedback: the slot still points before
    what is applied. A second slot created before the writes stands for that slot; started
    from the first slot's checkpoint it must apply only what came after. (The server skips
    transactions before the requested start; `test_worker_assemble` pins the worker's own
    skip, which also covers a partly applied transaction.)"""
    harness, dsn = app
    harness.setup()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('replay', 'pgoutput')")
    harness.start()
    run_sql(dsn, "INSERT INTO notes (owner, title) VALUES ('alice', 'one'), ('bob', 'two')")
    harness.wait_caught_up()
    run_sql(dsn, "UPDATE notes SET title = 'one again' WHERE id = 1")
    harness.wait_caught_up()
    harness.stop()
    before = change_log(dsn)
    assert len(before) == 3
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO slipstream.checkpoints (slot, lsn, last_seq) "
                     "SELECT 'replay', lsn, last_seq FROM slipstream.checkpoints WHERE slot = 'slipstream'")
        ChangeLog().release(conn, "slipstream")  # the replay slot takes over the change log
    replay = Harness(dsn, slot="replay")
    replay.start()
    run_sql(dsn, "INSERT INTO notes (owner, title) VALUES ('carol', 'three')")
    replay.wait_caught_up()
    replay.close()
    after = change_log(dsn)
    assert after[:3] == before
    assert [row[1:] for row in after[3:]] == [("carol", "3", "u")]
