"""Errors from the search database are typed `SlipstreamError`s, decided by the one policy table.

A transient failure (the connection lost, a deadlock, a server shutting down) is
retried; a missing table or a missing privilege stops the worker with a message.
"""

from __future__ import annotations

import time

import psycopg
import pytest
from psycopg import errors as pgerrors
from slipstream.index.errors import ConfigurationError, SlipstreamError
from slipstream.worker.errors import (
    DECISIONS,
    SearchDatabaseError,
    SearchPermissionError,
    classify,
    error_from_search,
    search_errors,
)

from .worker_harness import NOTES_DDL, Harness


@pytest.mark.parametrize(("exc", "decision", "cls"), [
    (psycopg.OperationalError("connection to server lost"), "retry", SearchDatabaseError),
    (pgerrors.AdminShutdown("terminating connection due to administrator command"), "retry",
     SearchDatabaseError),
    (pgerrors.DeadlockDetected("deadlock detected"), "retry", SearchDatabaseError),
    (pgerrors.DiskFull("could not extend file"), "retry", SearchDatabaseError),
    (pgerrors.UndefinedTable('relation "slipstream.docs" does not exist'), "stop",
     SearchDatabaseError),
    (pgerrors.UniqueViolation("duplicate key"), "stop", SearchDatabaseError),
    (pgerrors.InsufficientPrivilege("permission denied for table docs"), "stop",
     SearchPermissionError),
])
def test_search_errors_are_typed_and_decided_by_sqlstate(exc, decision, cls) -> None:
    err = error_from_search(exc, doing="commit an apply transaction")
    assert type(err) is cls and isinstance(err, SlipstreamError)
    assert err.sqlstate == exc.sqlstate
    assert classify(err) == decision
    assert "commit an apply transaction" in str(err)


def test_permission_error_is_a_configuration_error_in_the_table() -> None:
    assert issubclass(SearchPermissionError, ConfigurationError)
    assert DECISIONS[SearchPermissionError] == "stop"


def test_search_errors_context_keeps_the_cause_and_passes_other_errors() -> None:
    with pytest.raises(SearchDatabaseError) as info, search_errors("read"):
        raise pgerrors.UndefinedTable("gone")
    assert isinstance(info.value.__cause__, pgerrors.UndefinedTable)
    with pytest.raises(KeyError), search_errors("read"):
        raise KeyError("not a database error")


def test_a_dropped_search_table_stops_the_stream_with_a_typed_error(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(NOTES_DDL)
    harness = Harness(pg_dsn)
    harness.setup()
    harness.start()
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO notes (owner, title) VALUES ('a', 'before')")
        harness.wait_caught_up()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE slipstream.docs CASCADE")
            conn.execute("INSERT INTO notes (owner, title) VALUES ('a', 'after')")
        deadline = time.monotonic() + 30
        while harness.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not harness.thread.is_alive(), "the worker kept retrying a permanent error"
        err = harness.error
        assert isinstance(err, SearchDatabaseError), repr(err)
        assert err.sqlstate == "42P01" and classify(err) == "stop"
        assert "slipstream setup" in str(err)
        assert not any(e == "reconnecting" for e, _ in harness.events)
    finally:
        harness.error = None
        harness.close()
