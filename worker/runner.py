"""The streaming loop: read the slot, hand batches to the apply pipeline, report what is durable.

This module owns the I/O around the `Batcher` (which decides, without I/O, when a
batch is cut, when a chore runs, what to acknowledge and how long to wait): one
thread reads the replication stream, decodes and assembles it, feeds the batcher and
carries out its actions. Between reads it sleeps in one poll(2) on the replication
socket, the pipeline's completion pipe and a stop pipe together, so it wakes the
moment any of them has something, and never polls in a loop. The flush LSN sent to
the server is only ever the checkpoint of a committed apply transaction, or — when
nothing is pending — the server's own keepalive position, so idle tables do not pin
WAL. While streaming, an `AnnIndexer` thread keeps the HNSW side tables current,
woken after each commit. Failures go to the one retry policy (`errors.RetryPolicy`): retried with
backoff, which starts over once a connection has held; anything else stops the loop.
"""

from __future__ import annotations

import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
from slipstream.index.pg_ann import AnnIndexer

from .apply import Applier, ApplyResult
from .assemble import TxnAssembler
from .batcher import (
    Action,
    Applied,
    Batcher,
    BatcherSettings,
    ChoreFinished,
    Drained,
    Flush,
    KeepaliveReceived,
    Received,
    RunChore,
    SendStatus,
    Stopped,
    StopRequested,
    Submit,
    Tick,
    Wait,
)
from .incoming import Batch
from .errors import RetryPolicy
from .pgoutput import decode
from .pipeline import ApplyPipeline, ChoreDone
from .replication import Keepalive, ReplicationConnection, XLogData


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    source_dsn: str
    slot: str
    publication: str
    max_changes: int = 2000
    max_bytes: int = 8 * 1024 * 1024
    max_seconds: float = 0.25
    status_interval: float = 10.0
    heartbeat_seconds: float = 0.0
    pending_interval: float = 5.0  # how often pending embeddings are retried
    compact_interval: float | None = None  # how often the change log is compacted (None: never)
    tombstone_retention: float = 7 * 24 * 3600.0  # deletes older than this leave the log
    chore_every: int = 8  # under sustained load, a chore gets a turn after this many batches


class StreamRunner:
    """Follows one slot until stopped. `make_applier` opens a fresh search-side applier."""

    def __init__(self, settings: RunnerSettings, make_applier: Callable[[], Applier], *,
                 tables: set[str] | None = None, table_oids: dict[str, int] | None = None,
                 type_aliases: dict[int, int] | None = None,
                 table_keys: dict[str, tuple[str, ...]] | None = None,
                 retry: RetryPolicy | None = None,
                 on_batch: Callable[[ApplyResult, Batch], None] | None = None,
                 backfill: Callable[[Applier], Iterator[object]] | None = None,
                 log: Callable[..., None] | None = None) -> None:
        self.settings = settings
        self.make_applier = make_applier
        self.tables = tables
        self.table_oids = table_oids  # name -> current OID (see `TxnAssembler`)
        self.type_aliases = type_aliases  # type OID -> OID to decode as (see `typealias`)
        self.table_keys = table_keys  # name -> key columns (see `TxnAssembler`)
        self.retry = retry or RetryPolicy()
        self.on_batch = on_batch
        self.backfill = backfill
        self.log = log or (lambda event, **kw: None)
        self.stopping = threading.Event()
        self.flushed = 0
        self.ready = threading.Event()
        self.last_beat = time.monotonic()
        self.waits = 0  # how many times the reader has slept (blocking polls)
        # stop() writes here, so a reader asleep in poll() wakes at once.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._streaming_since: float | None = None
        self.ann: AnnIndexer | None = None  # drains the HNSW queue while streaming

    # -- control --------------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        self.stopping.set()
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already woken (or closed): the flag is what counts

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> None:
        """Run until `stop()`; retries what the retry policy says to retry, raises the rest.

        The backoff grows with consecutive failures and starts again from the first delay
        once a connection has streamed for the policy's `healthy_after` seconds.
        """
        attempt = 0
        while not self.stopping.is_set():
            self._streaming_since = None
            try:
                self._run_once()
                return
            except Exception as exc:  # noqa: BLE001 - the retry policy decides what it is
                err = exc
            self.ready.clear()
            held = 0.0 if self._streaming_since is None else time.monotonic() - self._streaming_since
            attempt = self.retry.attempt_after(attempt, held)
            decision = self.retry.decide(err, attempt)
            if decision.action != "retry":
                raise err
            self.log("reconnecting", reason=str(err)[:300], delay_s=round(decision.delay, 2),
                     attempt=attempt, held_s=round(held, 1), error=type(err).__name__)
            attempt += 1
            if self.stopping.wait(decision.delay):
                return

    # -- one connection's life ------------------------------------------------------------

    def _run_once(self) -> None:
        s = self.settings
        applier = self.make_applier()
        pipeline = ApplyPipeline(applier)
        heartbeat = _Heartbeat(s.source_dsn, s.heartbeat_seconds) if s.heartbeat_seconds > 0 else None
        # HNSW side tables are brought up to date off the apply path, woken by each commit.
        backend = applier.backend
        self.ann = AnnIndexer(backend.ann_step, log=self.log).start() \
            if getattr(backend, "ann_spaces", None) else None
        try:
            with ReplicationConnection.connect(s.source_dsn, status_interval=s.status_interval) as conn:
                cp = applier.checkpoint
                conn.start_replication(s.slot, cp.lsn, publication_names=[s.publication],
                                       proto_version=1, messages=True)
                self.flushed = max(self.flushed, cp.lsn)
                if self.flushed:
                    conn.send_status(flushed=self.flushed)
                self._streaming_since = time.monotonic()
                self.ready.set()
                self.log("streaming", slot=s.slot, start_lsn=cp.lsn)
                self._loop(conn, applier, pipeline)
        finally:
            pipeline.close()
            if self.ann is not None:
                self.ann.close()
            if heartbeat is not None:
                heartbeat.close()
            applier.close()

    def _compact(self, applier: Applier) -> object:
        report = applier.compact(self.settings.tombstone_retention)
        self.log("change_log_compacted", superseded=report.superseded, tombstones=report.tombstones,
                 docs_purged=report.docs_purged, horizon=report.horizon,
                 duration_s=round(report.seconds, 3))
        return report

    def _loop(self, conn: ReplicationConnection, applier: Applier, pipeline: ApplyPipeline) -> None:
        s = self.settings
        assembler = TxnAssembler(applier.checkpoint, self.tables, self.table_oids, self.type_aliases,
                                 self.table_keys)
        # Tables to copy while streaming: one chunk per chore, on the writer.
        steps = self.backfill(applier) if self.backfill is not None else None
        batcher = Batcher(BatcherSettings(
            max_changes=s.max_changes, max_bytes=s.max_bytes, max_seconds=s.max_seconds,
            status_interval=s.status_interval, pending_interval=s.pending_interval,
            compact_interval=s.compact_interval, chore_every=s.chore_every), now=time.monotonic(), flushed=self.flushed,
            backfill=steps is not None)
        chores: dict[str, Callable[[], object]] = {
            "backfill": lambda: next(steps, _DONE) if steps is not None else _DONE,
            "fill_pending": applier.fill_pending,
            "compact": lambda: self._compact(applier)}

        def act(actions: list[Action]) -> Wait | None:
            """Carry out the batcher's actions; the wait it asks for, or None once stopped."""
            for action in actions:
                match action:
                    case Wait():
                        return action
                    case Submit(batch):
                        pipeline.submit(batch)
                    case RunChore(kind):
                        pipeline.submit_chore(kind, chores[kind])
                    case Flush(lsn):
                        self.flushed = lsn
                        conn.send_status(flushed=lsn)
                    case SendStatus():
                        conn.send_status()
                    case Stopped(abandoned):
                        self.log("stopped", flushed_lsn=self.flushed, abandoned_changes=abandoned)
                        return None
            raise AssertionError("the batcher answered without a Wait or Stopped")

        def collect() -> Wait | None:
            """Report finished work to the batcher; its last wait, None if nothing finished."""
            wait = None
            for done in pipeline.collect():  # re-raises an apply failure
                now = time.monotonic()
                if isinstance(done, ChoreDone):
                    wait = act(batcher.send(ChoreFinished(now, done.name, done.value is _DONE)))
                    continue
                wait = act(batcher.send(Applied(now, done.result.checkpoint.lsn)))
                if self.ann is not None:
                    self.ann.poke()
                if self.on_batch is not None:
                    self.on_batch(done.result, done.batch)
            return wait

        def read() -> tuple[Wait | None, bool]:
            """Read what is buffered or arriving, a chunk of messages per batcher event;
            (the wait asked for, whether more may still be buffered)."""
            while True:
                items: list = []
                wal_end = 0
                drained = False
                for _ in range(READ_CHUNK):
                    message = conn.read_message(timeout=0)
                    if message is None:
                        drained = True
                        break
                    if isinstance(message, XLogData):
                        items += assembler.feed(decode(message.payload))
                    elif isinstance(message, Keepalive):
                        wal_end = max(wal_end, message.wal_end)
                now = self.last_beat = time.monotonic()
                wait = None
                if items:
                    wait = act(batcher.send(Received(now, items, assembler.in_transaction,
                                                     assembler.position())))
                # After the items: a keepalive only moves the flush LSN when nothing is open.
                if wal_end and not batcher.stopped:
                    wait = act(batcher.send(KeepaliveReceived(now, wal_end)))
                if drained and not batcher.stopped:
                    return act(batcher.send(Drained(now))), False
                wait = collect() or wait  # a long backlog: let finished batches out, new ones in
                if wait is None and not batcher.stopped:
                    wait = act(batcher.send(Tick(now)))
                if batcher.stopped or not wait.read or self.stopping.is_set():
                    return wait, not drained

        sock, woken, stop_fd = conn.fileno(), pipeline.fileno(), self._wake_r.fileno()
        buffered = True  # libpq may already hold messages: read them before waiting
        wait = act(batcher.send(Tick(time.monotonic())))
        while not batcher.stopped:
            assert wait is not None
            self.last_beat = time.monotonic()
            if self.stopping.is_set() and not batcher.stopping:
                wait = act(batcher.send(StopRequested(time.monotonic())))
                continue
            if wait.read and buffered and not batcher.stopping:
                wait, buffered = read()
                continue
            # Sleep until the pipeline finishes something, the socket has data (when reading),
            # a stop is asked for, or the batcher's deadline: never a busy poll.
            poller = select.poll()
            poller.register(woken, select.POLLIN)
            poller.register(stop_fd, select.POLLIN)
            if wait.read and not batcher.stopping:
                poller.register(sock, select.POLLIN)
            timeout = None if wait.until is None else max(0.0, wait.until - time.monotonic()) * 1000
            ready = {fd for fd, _ in poller.poll(timeout)}
            self.waits += 1
            if stop_fd in ready:
                self._drain_stop()
            if sock in ready:
                buffered = True
            if woken in ready:
                wait = collect() or wait
            if not ready:
                wait = act(batcher.send(Tick(time.monotonic())))

    def _drain_stop(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except BlockingIOError:
            pass


_DONE = object()
READ_CHUNK = 64  # replication messages read per batcher event, at most


class _Heartbeat:
    """Emits a transactional logical message every `seconds`, so a slot whose tables are
    idle still sees transactions it can confirm while other databases write."""

    def __init__(self, dsn: str, seconds: float) -> None:
        self.dsn, self.seconds = dsn, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slipstream-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute("SELECT pg_logical_emit_message(true, 'slipstream.heartbeat', now()::text)")
            except psycopg.Error:
                continue  # the stream's own reconnect loop reports connection trouble

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
