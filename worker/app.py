"""A worker built from its configuration: the pieces `slipstream setup`, `run` and `status` use.

`Worker(config)` opens the search backend, the embedders, the mapper registry and the
worker state; `setup()`, `run()`, `status()` and the dead-letter operations are what
the command line calls. Nothing connects at import time.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import psycopg
from slipstream.index import PostgresBackend, SearchIndex
from slipstream.index.errors import ConfigurationError

from .apply import Applier, ApplyResult
from .incoming import Batch, SourceChange, row_key
from .config import WorkerConfig
from .embedders import build_embedders
from .errors import SlotInvalidatedError, search_errors, slot_invalidated_message
from .health import HealthServer
from .logs import get_logger
from .lsn import format_lsn, parse_lsn
from .mapping import Registry
from .metrics import BatchLog, Metrics, MetricsPoller, SlotLag, lag_from_slot
from .pgtypes import source_conninfo
from .progress import estimate_rows, progress_reporter
from .runner import RunnerSettings, StreamRunner
from .setup import SetupReport, setup, slot_exists
from .snapshot import TableShape, copy_steps, pending_tables, read_row, table_shape
from .state import WorkerState
from .tablewatch import TableWatch
from .typealias import type_aliases


@dataclass(frozen=True, slots=True)
class Status:
    slot: dict[str, Any] | None
    checkpoint: dict[str, Any] | None
    counts: list[tuple[str, int, int]]  # object_type, live, tombstones
    dead_letters: int
    dead_letters_by_table: dict[str, int]
    pending_embeddings: int
    ann_queue: int  # rows not yet in the HNSW side tables
    snapshot: list[tuple[str, int, bool]]


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.log = get_logger("slipstream.worker")
        self.source_dsn = source_conninfo(config.source.resolve_dsn())  # values read as streamed
        self.search_dsn = config.search.resolve_dsn(config.source)
        self.slot, self.publication = config.source.slot, config.source.publication
        self.registry = Registry.from_config(config)
        self.backend = PostgresBackend(self.search_dsn, schema=config.search.schema,
                                       spaces=dict(config.spaces), exact_limit=config.search.exact_limit,
                                       hnsw=config.search.hnsw, defer_ann=True,
                                       cache_max_rows=config.embed_cache_rows())
        self.metrics = Metrics()
        self.index = SearchIndex(self.backend, build_embedders(config.embedders, metrics=self.metrics),
                                 observer=self.metrics.index_event)
        self.state = WorkerState(config.search.schema)
        with psycopg.connect(self.search_dsn) as conn:
            self.state.migrate(conn)
        self.lag_poller: MetricsPoller | None = None
        self._resolved = False
        self.table_oids: dict[str, int] = {}  # each configured table's OID, from `resolve_tables`
        self.type_aliases: dict[int, int] = {}  # domains and arrays, from `resolve_tables`
        self.table_keys: dict[str, tuple[str, ...]] = {}  # each table's key columns, likewise

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
            self.type_aliases = type_aliases(conn)
            for table in self.tables:
                shape = table_shape(conn, table, self.type_aliases)
                self.registry.resolve(table, [c[0] for c in shape.columns], shape.key,
                                      unpublished=shape.unpublished, unique=shape.unique)
                self.table_oids[table] = shape.oid
                self.table_keys[table] = shape.key
        self._resolved = True

    def mapping_of(self, relation: str) -> str | None:
        """What decides `relation`'s documents (`Registry.fingerprint`), with the spaces they
        are embedded in: a space added to the configuration embeds every row in it."""
        own = self.registry.fingerprint(relation)
        return None if own is None else f"{own} spaces={','.join(sorted(self.config.spaces))}"

    def mapper_for(self, relation: str) -> Callable | None:
        return partial(self.registry.map, relation) if relation in self.registry else None

    def make_applier(self) -> Applier:
        with search_errors("open the apply connections"):
            conn = self.backend.connect()
            self.state.claim_writer(conn, self.slot)
            conn.commit()
            return Applier(conn, self.index, self.state, self.mapper_for, self.slot,
                           read_conn=self.backend.connect(autocommit=True),
                           mapping_of=self.mapping_of)

    # -- commands -------------------------------------------------------------------------

    def setup(self, progress: Callable[[str, int], None] | None = None, *,
              copy_pending: bool = True, notice: Callable[[str], None] | None = None,
              recopy: Sequence[str] = (), forget: Sequence[str] = ()) -> SetupReport:
        self.resolve_tables()
        unknown = [t for t in recopy if t not in self.tables]
        if unknown:
            raise ConfigurationError(
                f"--recopy {unknown[0]!r}: not a configured table (configured: "
                f"{', '.join(self.tables)})")
        applier = self.make_applier()
        try:
            before = self.state.last_dead_letter_id(applier.conn)
            applier.conn.commit()
            report = setup(self.source_dsn, slot=self.slot, publication=self.publication,
                           tables=self.tables, applier=applier,
                           search_schema=self.config.search.schema if self._same_database() else None,
                           chunk_rows=self.config.worker.snapshot_chunk_rows,
                           chunk_bytes=self.config.worker.batch_max_bytes, progress=progress,
                           copy_pending=copy_pending, notice=notice, recopy=recopy, forget=forget)
            report.dead_letters = self.state.open_dead_letters(applier.conn, before)
            applier.conn.commit()
            return report
        finally:
            applier.close()

    def estimate_rows(self, table: str) -> int | None:
        """The source planner's row count estimate for `table` (for progress ETAs)."""
        with psycopg.connect(self.source_dsn, autocommit=True) as conn:
            return estimate_rows(conn, table)

    def _same_database(self) -> bool:
        def ident(dsn: str) -> tuple:
            with psycopg.connect(dsn) as c:
                return c.execute("SELECT system_identifier FROM pg_control_system()").fetchone() + (
                    c.info.dbname,)
        return ident(self.source_dsn) == ident(self.search_dsn)

    def _copy_progress(self, event: str = "copy_progress") -> Callable[[str, int], None]:
        """The copy's hook: counts rows into `snapshot_rows_total` and logs rate and ETA."""
        report = progress_reporter(self.log, event, estimate=self.estimate_rows)
        seen: dict[str, int] = {}

        def progress(table: str, copied: int) -> None:
            self.metrics.snapshot_rows_total.labels(table=table).inc(copied - seen.get(table, 0))
            seen[table] = copied
            report(table, copied)

        return progress

    def _backfill(self, applier: Applier) -> Iterator[object]:
        """Copy, chunk by chunk, the tables whose copy has not finished (added to the config later)."""
        todo = pending_tables(applier, self.tables)
        if not todo:
            return
        progress = self._copy_progress("backfill_progress")
        with psycopg.connect(self.source_dsn, autocommit=True) as source:
            for table in todo:
                self.log.info("backfill_started", table=table)
                shape = table_shape(source, table, self.type_aliases)  # decoded as the stream is
                for copied in copy_steps(applier, source, shape,
                                         chunk_rows=self.config.worker.snapshot_chunk_rows,
                                         chunk_bytes=self.config.worker.batch_max_bytes):
                    progress(table, copied)
                    yield copied
                self.log.info("backfill_done", table=table)

    def runner(self) -> StreamRunner:
        w = self.config.worker
        settings = RunnerSettings(
            self.source_dsn, self.slot, self.publication, max_changes=w.batch_max_changes,
            max_bytes=w.batch_max_bytes, max_seconds=w.batch_max_seconds,
            status_interval=w.status_interval_seconds, heartbeat_seconds=w.heartbeat_seconds,
            compact_interval=w.compact_interval_seconds or None,
            tombstone_retention=w.tombstone_retention_seconds)
        batch_log = BatchLog(self.metrics)

        def on_batch(result: ApplyResult, batch: Batch) -> None:
            for txn in batch.completed:  # every transaction, not only the batch's last
                self.metrics.observe_commit(datetime.fromtimestamp(txn.commit_ts, UTC))
            lag_s = time.time() - batch.completed[-1].commit_ts if batch.completed else None
            slot = self.lag_poller.latest if self.lag_poller is not None else None
            batch_log.log_batch(
                self.log, transactions=result.transactions, changes=result.changes,
                bytes=batch.bytes, lag_bytes=None if slot is None else slot.lag_bytes,
                lag_seconds=lag_s, duration_s=result.seconds,
                first_lsn=batch.changes[0].commit_lsn if batch.changes else result.checkpoint.lsn,
                last_lsn=result.checkpoint.lsn,
                ops={"upsert": result.upserts, "delete": result.tombstones})
            for table, n in result.dead_by_table.items():
                self.metrics.dead_letters_total.labels(table=table).inc(n)
                self.log.warning("dead_letters", table=table, count=n)

        def log(event: str, **kw: object) -> None:
            if event == "reconnecting":
                self.metrics.reconnects_total.labels(reason=str(kw.get("error", "unknown"))).inc()
            self.log.info(event, **kw)

        return StreamRunner(settings, self.make_applier, tables=set(self.tables),
                            table_oids=dict(self.table_oids), type_aliases=dict(self.type_aliases),
                            table_keys=dict(self.table_keys),
                            on_batch=on_batch,
                            backfill=self._backfill, log=log)

    def _read_lag(self) -> SlotLag | None:
        with psycopg.connect(self.source_dsn, autocommit=True, connect_timeout=10) as conn:
            return lag_from_slot(conn, self.slot)

    def _read_pending(self) -> dict[str, int]:
        with psycopg.connect(self.search_dsn, autocommit=True, connect_timeout=10) as conn:
            return self.backend.pending_counts(conn)

    def _read_ann(self) -> int:
        with psycopg.connect(self.search_dsn, autocommit=True, connect_timeout=10) as conn:
            return self.backend.ann_queue_rows(conn)

    def run(self, *, http: bool = True) -> None:
        """Set up what is missing, then follow the slot until SIGTERM/SIGINT.

        A configured table dropped and created again under its name while this runs
        (`TableWatch`) stops the stream after a flush; setup then runs again, which
        copies the new table, and the stream goes on. Raises `SlotInvalidatedError` when
        the server has invalidated the slot, whether the stream finds out (on
        reconnect) or the lag poller does first.
        """
        runner: StreamRunner | None = None
        terminating = threading.Event()
        lost: list[SlotLag] = []

        def terminate(*_: object) -> None:
            terminating.set()
            if runner is not None:
                runner.stop()

        def on_lost(lag: SlotLag) -> None:
            lost.append(lag)
            terminate()

        self.lag_poller = MetricsPoller(
            self.metrics, self._read_lag, read_pending=self._read_pending, read_ann=self._read_ann,
            on_lost=on_lost,
            spaces=self.config.spaces, interval=self.config.worker.metrics_interval_seconds,
            log=self.log).start()
        server = None
        port = self.config.worker.http_port
        if http and port:
            server = HealthServer(
                self.metrics, host="0.0.0.0", port=port,
                readiness=lambda: (runner is not None and runner.ready.is_set(), "streaming"
                                   if runner is not None and runner.ready.is_set() else "not streaming yet"),
                liveness=lambda: (runner is None or time.monotonic() - runner.last_beat < 60,
                                  "loop alive"))
            server.start()
        try:
            while not terminating.is_set():
                # A signal during setup ends the process as it always did (setup is safe to
                # stop anywhere); while streaming, it stops the stream after a flush.
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                # Tables added to an existing slot's config are copied while streaming
                # (runner backfill); so is a table swapped in under a configured name.
                report = self.setup(progress=self._copy_progress(), copy_pending=False,
                                    notice=lambda line: self.log.warning("slot_waiting", detail=line))
                self.log.info("setup_done", created_slot=report.created_slot, copied=report.copied,
                              added_tables=report.added_tables, backfill=report.deferred,
                              via_partition_root=report.via_partition_root,
                              generated_columns=report.generated_columns, replaced=report.replaced,
                              remapped=report.remapped, resynced=report.resynced)
                if report.unconfigured:
                    self.log.warning("tables_unconfigured", tables=report.unconfigured,
                                     action="their documents stay searchable; `slipstream setup "
                                            "--forget TABLE` tombstones them")
                runner = self.runner()
                signal.signal(signal.SIGTERM, terminate)
                signal.signal(signal.SIGINT, terminate)
                replaced: list[str] = []

                def on_replaced(tables: list[str], current: StreamRunner = runner) -> None:
                    replaced.extend(tables)
                    current.stop()

                watch = TableWatch(self.source_dsn, self.table_oids, on_replaced, keys=self.table_keys,
                                   interval=self.config.worker.metrics_interval_seconds,
                                   publication=self.publication, log=self.log).start()
                try:
                    runner.run()
                finally:
                    watch.stop()
                if not replaced or terminating.is_set():
                    break
                self.log.warning("table_replaced", tables=replaced,
                                 action="the stream stopped; setting up again to copy the table afresh "
                                        "(or to put it back in the publication and catch it up)")
                self._resolved = False  # read the new tables' OIDs, columns and keys
        except SlotInvalidatedError as exc:  # say it with this worker's schema
            raise SlotInvalidatedError(
                slot_invalidated_message(self.slot, self.config.search.schema,
                                         detail=exc.server_message or ""),
                sqlstate=exc.sqlstate, server_message=exc.server_message) from exc
        finally:
            self.lag_poller.stop()
            if server is not None:
                server.stop()
        if lost:
            raise SlotInvalidatedError(slot_invalidated_message(self.slot, self.config.search.schema))

    def status(self) -> Status:
        with psycopg.connect(self.source_dsn) as source:
            lag = lag_from_slot(source, self.slot)
        with psycopg.connect(self.search_dsn) as conn:
            own = self.state.status(conn, self.slot)
            counts = self.backend.counts_by_type(conn)
            pending = sum(self.backend.pending_counts(conn).values())
            ann_queue = self.backend.ann_queue_rows(conn)
        return Status(
            slot=None if lag is None else {
                "name": self.slot, "active": lag.active, "lag_bytes": lag.lag_bytes,
                "confirmed_flush_lsn": format_lsn(lag.confirmed_flush_lsn) if lag.confirmed_flush_lsn else None,
                "wal_status": lag.wal_status},
            checkpoint=own["checkpoint"], counts=counts,
            dead_letters=sum(own["dead_letters"].values()), dead_letters_by_table=own["dead_letters"],
            pending_embeddings=pending, ann_queue=ann_queue, snapshot=own["snapshot"])

    # -- dead letters ---------------------------------------------------------------------

    def dead_letters(self, limit: int = 50) -> list[tuple]:
        with psycopg.connect(self.search_dsn) as conn:
            return self.state.dead_letter_rows(conn, limit=limit)

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
            letters = self.state.dead_letter_rows(applier.conn, ids=ids)
            applier.conn.commit()
            with psycopg.connect(self.source_dsn, autocommit=True) as source:
                shapes: dict[str, TableShape] = {}  # read once per table, not per letter
                for letter_id, _, relation, _, key, _ in letters:
                    if relation not in shapes:
                        shapes[relation] = table_shape(source, relation)
                    ok = self._retry_one(applier, source, letter_id, shapes[relation], key)
                    resolved, failing = resolved + ok, failing + (not ok)
        finally:
            applier.close()
        return resolved, failing

    def _retry_one(self, applier: Applier, source: psycopg.Connection, letter_id: int,
                   shape: TableShape, key: str | None) -> bool:
        relation = shape.relation
        (lsn_text,) = source.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        batch = Batch(snapshot=True)
        values = read_row(source, shape, json.loads(key)) if key is not None else None
        if values is not None:
            batch.changes.append(SourceChange(
                kind="snapshot", relation=relation, commit_lsn=parse_lsn(lsn_text),
                key=row_key(values, shape.key), values=dict(values), columns=shape.type_oids))
        last_id = self.state.last_dead_letter_id(applier.conn)
        applier.conn.commit()
        # In the apply transaction: a row that fails again has just been dead-lettered anew;
        # that letter is folded into this one. With no row (it is gone) the batch is empty:
        # nothing left to index, letter resolved.
        settle = partial(self.state.settle_retried_letter, letter_id=letter_id, after_id=last_id)
        return applier.apply(batch, also=settle).dead_letters == 0

    def slot_exists(self) -> bool:
        with psycopg.connect(self.source_dsn) as conn:
            return slot_exists(conn, self.slot)
