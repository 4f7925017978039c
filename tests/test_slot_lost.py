"""A slot the server invalidated (`wal_status = 'lost'`) stops the worker with what to run.

Provoked for real on a server of its own with `max_slot_wal_keep_size = 1MB`: the slot
is created by `slipstream setup`, the worker stays stopped while WAL segments are
written and switched, and a checkpoint removes the WAL the slot still needed.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from slipstream.worker.errors import SlotInvalidatedError, classify, error_from_server
from slipstream.worker.metrics import Metrics, MetricsPoller, SlotLag

from .cli_harness import cli, environ, shown, write_config

SLOT = "slipstream"


def _wal_status(dsn: str) -> str | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                           (SLOT,)).fetchone()
    return None if row is None else row[0]


def _lose_the_slot(dsn: str) -> bool:
    """Write and switch WAL segments, then checkpoint, until the server invalidates the slot."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS filler (payload text)")
        for _ in range(12):
            for _ in range(3):
                conn.execute("INSERT INTO filler SELECT repeat(md5(g::text), 64) "
                             "FROM generate_series(1, 400) g")
                conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            if _wal_status(dsn) == "lost":
                return True
            time.sleep(0.1)
    return False


@pytest.fixture
def small_wal_server(pg_server):
    if pg_server.embedded is None:
        pytest.skip("needs the embedded server to start one with max_slot_wal_keep_size = 1MB")
    from slipstream.worker.localpg import EmbeddedPostgres

    with EmbeddedPostgres(durable=False, settings={
            "max_slot_wal_keep_size": "1MB", "wal_keep_size": "0", "min_wal_size": "32MB",
            "max_wal_size": "64MB"}) as server:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
        dsn = server.dsn("app")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION vector")
            conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, title text, body text)")
            conn.execute("INSERT INTO notes (title, body) VALUES ('one', 'first'), ('two', 'second')")
        yield dsn


def test_lost_slot_stops_the_worker_saying_what_happened_and_what_to_run(
        small_wal_server: str, tmp_path: Path) -> None:
    dsn = small_wal_server
    config = write_config(tmp_path / "slipstream.toml", dsn,
                          '[tables."public.notes"]\ntitle = "{title}"\nbody = "{body}"\n',
                          extra='\n[search]\nschema = "search_idx"\n')
    done = cli("setup", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, shown(done)
    assert _wal_status(dsn) in ("reserved", "extended")
    if not _lose_the_slot(dsn):
        pytest.skip(f"the server did not invalidate the slot (wal_status {_wal_status(dsn)!r})")

    run = cli("run", "--config", str(config), "--no-http", cwd=tmp_path, env=environ(),
              timeout=120)
    assert run.returncode == 1, shown(run)
    err = run.stderr
    assert "replication slot 'slipstream' was invalidated" in err, shown(run)
    assert "max_slot_wal_keep_size" in err
    assert "SELECT pg_drop_replication_slot('slipstream');" in err
    assert "`slipstream setup`" in err and "rows deleted meanwhile tombstoned" in err
    assert "DROP SCHEMA search_idx CASCADE;" in err  # the other way, from nothing
    # `status` shows it too, without failing.
    status = cli("status", "--config", str(config), "--json", cwd=tmp_path)
    assert status.returncode == 0, shown(status)
    assert '"wal_status": "lost"' in status.stdout
    text = cli("status", "--config", str(config), cwd=tmp_path)
    assert text.returncode == 0, shown(text)
    assert "WAL lost" in text.stdout and "pg_drop_replication_slot('slipstream')" in text.stderr

    # The way out it names: drop the slot, then setup copies again and settles the gap.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot('slipstream')")
        conn.execute("UPDATE notes SET title = 'one, edited while lost' WHERE title = 'one'")
        conn.execute("DELETE FROM notes WHERE title = 'two'")
        conn.execute("INSERT INTO notes (title, body) VALUES ('three', 'third')")
    again = cli("setup", "--config", str(config), cwd=tmp_path)
    assert again.returncode == 0, shown(again)
    with psycopg.connect(dsn, autocommit=True) as conn:
        expected = {str(i): t for i, t in conn.execute("SELECT id, title FROM notes")}
        live = {i: t for i, t in conn.execute(
            "SELECT object_id, title FROM search_idx.docs WHERE NOT deleted")}
    assert live == expected and "one, edited while lost" in live.values(), live


# --- without a server ------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    'can no longer get changes from replication slot "slipstream"',
    'can no longer access replication slot "slipstream"',
])
def test_server_texts_for_an_invalidated_slot_are_typed_and_stop(text: str) -> None:
    err = error_from_server(f"ERROR:  {text}\n", sqlstate="55000", connection_lost=False,
                            user="app", dbname="app", slot=SLOT)
    assert isinstance(err, SlotInvalidatedError)
    assert classify(err) == "stop"
    assert "pg_drop_replication_slot('slipstream')" in str(err)


def test_lag_poller_feeds_the_gauges_and_reports_a_lost_slot_once() -> None:
    readings = iter([
        SlotLag(4096, 100, 90, True, "reserved"),
        SlotLag(8192, 100, 90, False, "lost"),
        SlotLag(None, None, None, False, "lost"),
    ])
    lost: list[SlotLag] = []
    pending = iter([{"remote": 3}, {}, {}])
    queued = iter([7, 0, 0])
    m = Metrics()
    poller = MetricsPoller(m, lambda: next(readings), read_pending=lambda: next(pending),
                           read_ann=lambda: next(queued),
                           on_lost=lost.append, spaces=["local", "remote"], interval=1.0)
    assert m.pending_embeddings.labels(space="local")._value.get() == 0
    poller.poll()
    assert m.slot_lag_bytes._value.get() == 4096
    assert m.pending_embeddings.labels(space="remote")._value.get() == 3
    assert m.ann_queue_rows._value.get() == 7
    assert not lost
    poller.poll()
    poller.poll()
    assert m.slot_lag_bytes._value.get() == 8192  # an unknown lag leaves the last value
    assert m.pending_embeddings.labels(space="remote")._value.get() == 0  # drained
    assert m.ann_queue_rows._value.get() == 0
    assert [lag.wal_status for lag in lost] == ["lost"]


def test_lag_poller_survives_a_failing_read() -> None:
    def broken() -> SlotLag:
        raise psycopg.OperationalError("connection refused")

    class Log:
        def __init__(self) -> None:
            self.events: list[str] = []

        def warning(self, event: str, **_: object) -> None:
            self.events.append(event)

    log = Log()
    m = Metrics()
    poller = MetricsPoller(m, broken, read_pending=lambda: {"local": 2}, log=log, interval=1.0)
    poller.poll()
    assert log.events == ["slot_lag_read_failed"]
    assert m.pending_embeddings.labels(space="local")._value.get() == 2
