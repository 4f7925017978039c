"""A worker built from its configuration: the pieces `slipstream setup`, `run` and `status` use.

`Worker(config)` opens the search backend, the embedders, the mapper registry and the
worker state; `setup()`, `run()`, `status()` and the dead-letter operations are what
the command line calls. Nothing connects at import time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import psycopg
from slipstream.index import PostgresBackend, SearchIndex

from .apply import Applier, ApplyResult
from .changes import Batch, SourceChange, row_key
from .config import WorkerConfig
from .embedders import build_embedders
from .lsn import format_lsn, parse_lsn
from .mapping import Registry
from .health import HealthServer
from .logs import get_logger
from .metrics import BatchLog, Metrics, SlotLagPoller, lag_from_slot
from .runner import RunnerSettings, StreamRunner
from .setup import SetupReport, setup, slot_exists
from .snapshot import copy_steps, pending_tables, read_row, table_shape
from .state import WorkerState


@dataclass(frozen=True, slots=True)
class Status:
    slot: dict[str, Any] | None
    checkpoint: dict[str, Any] | None
    counts: list[tuple[str, int, int]]  # object_type, live, tombstones
    dead_letters: int
    pending_embeddings: int
    snapshot: list[tuple[str, int, bool]]


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.log = get_logger("slipstream.worker")
        self.source_dsn = config.source.resolve_dsn()
        self.search_dsn = config.search.resolve_dsn(config.source)
        self.slot, self.publication = config.source.slot, config.source.publication
        self.registry = Registry.from_config(config)
        self.backend = PostgresBackend(self.search_dsn, schema=config.search.schema,
                                       spaces=dict(config.spaces), exact_limit=config.search.exact_limit,
                                       hnsw=config.search.hnsw)
        self.index = SearchIndex(self.backend, build_embedders(config.embedders))
        self.state = WorkerState(config.search.schema)
        with psycopg.connect(self.search_dsn) as conn:
            self.state.migrate(conn)
        self.metrics = Metrics()
        self._resolved = False

    def close(self) -> None:
        self.backend.close()

    # -- pieces ---------------------------------------------------------------------------

    @property
    def tables(self) -> list[str]:
        return list(self.registry.tables())

    def resolve_tables(self) -> None:
        """Check every TOML mapper against its table's columns and key (ConfigError if off)."""
        if self._resolved:
            return
        with psycopg.connect(self.source_dsn) as conn:
            for table in self.tables:
                shape = table_shape(conn, table)
                self.registry.resolve(table, [c[0] for c in shape.columns], shape.key)
        self._resolved = True

    def mapper_for(self, relation: str) -> Callable | None:
        return partial(self.registry.map, relation) if relation in self.registry else None

    def make_applier(self) -> Applier:
        conn = self.backend.connect()
        self.state.claim_writer(conn, self.slot)
        conn.commit()
        return Applier(conn, self.index, self.state, self.mapper_for, self.slot,
                       read_conn=self.backend.connect(autocommit=True))

    # -- commands -------------------------------------------------------------------------

    def setup(self, progress: Callable[[str, int], None] | None = None, *,
              copy_pending: bool = True) -> SetupReport:
        self.resolve_tables()
        applier = self.make_applier()
        try:
            return setup(self.source_dsn, slot=self.slot, publication=self.publication,
                         tables=self.tables, applier=applier,
                         search_schema=self.config.search.schema if self._same_database() else None,
                         chunk_rows=self.config.worker.snapshot_chunk_rows, progress=progress,
                         copy_pending=copy_pending)
        finally:
            applier.close()

    def _same_database(self) -> bool:
        def ident(dsn: str) -> tuple:
            with psycopg.connect(dsn) as c:
                return c.execute("SELECT system_identifier FROM pg_control_system()").fetchone() + (
                    c.info.dbname,)
        return ident(self.source_dsn) == ident(self.search_dsn)

    def _backfill(self, applier: Applier) -> Iterator[object]:
        """Copy, chunk by chunk, the tables whose copy has not finished (added to the config later)."""
        todo = pending_tables(applier, self.tables)
        if not todo:
            return
        with psycopg.connect(self.source_dsn, autocommit=True) as source:
            for table in todo:
                self.log.info("backfill_started", table=table)
                shape = table_shape(source, table)
                before = 0
                for copied in copy_steps(applier, source, shape,
                                         chunk_rows=self.config.worker.snapshot_chunk_rows):
                    self.metrics.snapshot_rows_total.labels(table=table).inc(copied - before)
                    before = copied
                    yield copied
                self.log.info("backfill_done", table=table)

    def runner(self) -> StreamRunner:
        w = self.config.worker
        settings = RunnerSettings(
            self.source_dsn, self.slot, self.publication, max_changes=w.batch_max_changes,
            max_bytes=w.batch_max_bytes, max_seconds=w.batch_max_seconds,
            status_interval=w.status_interval_seconds, heartbeat_seconds=w.heartbeat_seconds)
        batch_log = BatchLog(self.metrics)

        def on_batch(result: ApplyResult, batch: Batch) -> None:
            lag_s = time.time() - batch.completed[-1].commit_ts if batch.completed else None
            if batch.completed:
                self.metrics.observe_commit(
                    datetime.fromtimestamp(batch.completed[-1].commit_ts, UTC))
            batch_log.log_batch(
                self.log, transactions=result.transactions, changes=result.changes,
                bytes=batch.bytes, lag_bytes=None, lag_seconds=lag_s, duration_s=result.seconds,
                first_lsn=batch.changes[0].commit_lsn if batch.changes else result.checkpoint.lsn,
                last_lsn=result.checkpoint.lsn,
                ops={"upsert": result.upserts, "delete": result.tombstones})
            for table, n in result.dead_by_table.items():
                self.metrics.dead_letters_total.labels(table=table).inc(n)
                self.log.warning("dead_letters", table=table, count=n)

        return StreamRunner(settings, self.make_applier, tables=set(self.tables), on_batch=on_batch,
                            backfill=self._backfill,
                            log=lambda event, **kw: self.log.info(event, **kw))

    def run(self, *, http: bool = True) -> None:
        """Set up what is missing, then follow the slot until SIGTERM/SIGINT."""
        # Tables added to an existing slot's config are copied while streaming (runner backfill).
        report = self.setup(progress=lambda t, n: self.log.info("snapshot_progress", table=t, rows=n),
                            copy_pending=False)
        self.log.info("setup_done", created_slot=report.created_slot, copied=report.copied,
                      added_tables=report.added_tables, backfill=report.deferred)
        runner = self.runner()
        runner.install_signal_handlers()
        server = None
        port = self.config.worker.http_port
        if http and port:
            server = HealthServer(self.metrics, host="0.0.0.0", port=port,
                                  readiness=lambda: (runner.ready.is_set(), "streaming"
                                                     if runner.ready.is_set() else "not streaming yet"),
                                  liveness=lambda: (time.monotonic() - runner.last_beat < 60, "loop alive"))
            server.start()
        try:
            runner.run()
        finally:
            if server is not None:
                server.stop()

    def status(self) -> Status:
        with psycopg.connect(self.source_dsn) as source:
            lag = lag_from_slot(source, self.slot)
        with psycopg.connect(self.search_dsn) as conn:
            cp = conn.execute(self.state.q(
                "SELECT lsn::text, last_seq, updated_at FROM {s}.checkpoints WHERE slot = %s"),
                (self.slot,)).fetchone()
            counts = conn.execute(self.backend._q(
                "SELECT object_type, count(*) FILTER (WHERE NOT deleted), count(*) FILTER (WHERE deleted) "
                "FROM {s}.docs GROUP BY 1 ORDER BY 1")).fetchall()
            (dead,) = conn.execute(self.state.q(
                "SELECT count(*) FROM {s}.dead_letters WHERE resolved_at IS NULL")).fetchone()
            (pending,) = conn.execute(self.backend._q(
                "SELECT count(*) FROM {s}.docs WHERE pending_spaces <> '{{}}' AND NOT deleted")).fetchone()
            snap = conn.execute(self.state.q(
                "SELECT relation, rows_copied, done FROM {s}.snapshot_progress ORDER BY 1")).fetchall()
        return Status(
            slot=None if lag is None else {
                "name": self.slot, "active": lag.active, "lag_bytes": lag.lag_bytes,
                "confirmed_flush_lsn": format_lsn(lag.confirmed_flush_lsn) if lag.confirmed_flush_lsn else None,
                "wal_status": lag.wal_status},
            checkpoint=None if cp is None else {"lsn": cp[0], "last_seq": cp[1], "updated_at": cp[2].isoformat()},
            counts=[tuple(r) for r in counts], dead_letters=int(dead), pending_embeddings=int(pending),
            snapshot=[tuple(r) for r in snap])

    # -- dead letters ---------------------------------------------------------------------

    def dead_letters(self, limit: int = 50) -> list[tuple]:
        with psycopg.connect(self.search_dsn) as conn:
            return conn.execute(self.state.q(
                "SELECT id, created_at, relation, op, row_key, error FROM {s}.dead_letters "
                "WHERE resolved_at IS NULL ORDER BY id LIMIT %s"), (limit,)).fetchall()

    def retry_dead_letters(self, ids: list[int] | None = None) -> tuple[int, int]:
        """Re-map the current source row of each open dead letter; returns (resolved, still failing).

        The row is read again from the source (the mapper may have been fixed, or the row
        changed since), and applied like a copied row, so a newer streamed change wins.
        A letter that fails again stays open with the new error (no second letter is added).
        """
        self.resolve_tables()
        applier = self.make_applier()
        resolved = failing = 0
        try:
            letters = applier.conn.execute(self.state.q(
                "SELECT id, relation, row_key FROM {s}.dead_letters WHERE resolved_at IS NULL "
                "AND (%s::bigint[] IS NULL OR id = ANY(%s)) ORDER BY id"), (ids, ids)).fetchall()
            applier.conn.commit()
            with psycopg.connect(self.source_dsn, autocommit=True) as source:
                for letter_id, relation, key in letters:
                    ok = self._retry_one(applier, source, letter_id, relation, key)
                    resolved, failing = resolved + ok, failing + (not ok)
        finally:
            applier.close()
        return resolved, failing

    def _retry_one(self, applier: Applier, source: psycopg.Connection, letter_id: int,
                   relation: str, key: str | None) -> bool:
        shape = table_shape(source, relation)
        (lsn_text,) = source.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        batch = Batch(snapshot=True)
        values = read_row(source, shape, json.loads(key)) if key is not None else None
        if values is not None:
            batch.changes.append(SourceChange(
                kind="snapshot", relation=relation, commit_lsn=parse_lsn(lsn_text),
                key=row_key(values, shape.key), values=dict(values), columns=shape.type_oids))
        (last_id,) = applier.conn.execute(self.state.q(
            "SELECT coalesce(max(id), 0) FROM {s}.dead_letters")).fetchone()
        applier.conn.commit()

        def settle(conn: psycopg.Connection) -> None:
            # In the apply transaction: a row that fails again has just been dead-lettered
            # anew; fold that letter into this one, which stays open with the new error.
            again = conn.execute(self.state.q(
                "DELETE FROM {s}.dead_letters WHERE id > %s RETURNING error"),
                (last_id,)).fetchall()
            conn.execute(self.state.q(
                "UPDATE {s}.dead_letters SET retried_at = now(), error = coalesce(%s, error), "
                "resolved_at = CASE WHEN %s THEN now() END WHERE id = %s"),
                (again[-1][0] if again else None, not again, letter_id))

        # With no row (it is gone) the batch is empty: nothing left to index, letter resolved.
        return applier.apply(batch, also=settle).dead_letters == 0

    def slot_exists(self) -> bool:
        with psycopg.connect(self.source_dsn) as conn:
            return slot_exists(conn, self.slot)
