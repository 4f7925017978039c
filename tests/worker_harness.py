"""A worker assembled by hand around one test database: app table, publication, slot, runner thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

import psycopg
from slipstream.index import HashingEmbedder, IndexDoc, PostgresBackend, SearchIndex
from slipstream.worker.apply import Applier
from slipstream.worker.errors import RetryPolicy
from slipstream.worker.runner import RunnerSettings, StreamRunner
from slipstream.worker.setup import setup
from slipstream.worker.state import WorkerState

DIM = 32

NOTES_DDL = """
CREATE TABLE public.notes (
    id serial PRIMARY KEY,
    owner text NOT NULL,
    title text,
    body text,
    status text NOT NULL DEFAULT 'open'
);
"""


def note_mapper(row: Mapping[str, object], op: str) -> list[IndexDoc]:
    if row["status"] == "hidden":
        return []
    if row["title"] == "boom":
        raise RuntimeError("mapper exploded on purpose")
    return [IndexDoc("note", str(row["id"]), title=str(row["title"] or ""),
                     body=str(row["body"] or ""), partition=str(row["owner"]),
                     attrs={"status": row["status"]})]


class Harness:
    def __init__(self, dsn: str, mappers: dict[str, Callable] | None = None, *,
                 slot: str = "slipstream", publication: str = "slipstream",
                 source_dsn: str | None = None, max_seconds: float = 0.02,
                 heartbeat_seconds: float = 0.0, embedder=None, spaces=None) -> None:
        self.dsn = dsn
        self.source_dsn = source_dsn or dsn
        self.mappers = mappers if mappers is not None else {"public.notes": note_mapper}
        self.slot, self.publication = slot, publication
        self.backend = PostgresBackend(dsn, spaces=spaces or {"local": DIM})
        self.index = SearchIndex(self.backend, embedder or HashingEmbedder(DIM))
        self.state = WorkerState()
        with psycopg.connect(dsn) as conn:
            self.state.migrate(conn)
        self.settings = RunnerSettings(self.source_dsn, slot, publication, max_seconds=max_seconds,
                                       status_interval=1.0, heartbeat_seconds=heartbeat_seconds)
        self.runner: StreamRunner | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.events: list[tuple[str, dict]] = []

    def applier(self) -> Applier:
        conn = self.backend.connect()
        self.state.claim_writer(conn, self.slot)
        conn.commit()
        return Applier(conn, self.index, self.state, self.mappers.get, self.slot,
                       read_conn=self.backend.connect(autocommit=True))

    def setup(self):
        applier = self.applier()
        try:
            return setup(self.source_dsn, slot=self.slot, publication=self.publication,
                         tables=list(self.mappers), applier=applier, search_schema="slipstream",
                         chunk_rows=50)
        finally:
            applier.close()

    def start(self) -> None:
        self.runner = StreamRunner(self.settings, self.applier, tables=set(self.mappers),
                                   retry=RetryPolicy(initial_delay=0.05, max_delay=0.5),
                                   log=lambda event, **kw: self.events.append((event, kw)))
        self.error = None

        def run() -> None:
            try:
                self.runner.run()
            except BaseException as exc:  # surfaced by wait_caught_up / stop
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.thread.join(timeout=30)
            assert not self.thread.is_alive(), "the runner did not stop"
        if self.error is not None:
            raise self.error

    def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Wait until every source transaction committed so far is applied."""
        with psycopg.connect(self.source_dsn, autocommit=True) as conn:
            (target,) = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        from slipstream.worker.lsn import parse_lsn

        goal = parse_lsn(target)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error is not None:
                raise self.error
            if self.runner is not None and self.runner.flushed >= goal:
                return
            time.sleep(0.02)
        raise TimeoutError(f"worker did not catch up to {target} (flushed {self.runner.flushed:X})")

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.backend.close()
