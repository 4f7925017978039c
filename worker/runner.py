"""The streaming loop: read the slot, cut batches, apply them in order, report what is durable.

One thread reads the replication stream and assembles batches; the apply pipeline
plans the next batch while the previous one commits. A batch closes when it reaches
`max_changes` or `max_bytes`, or has been open `max_seconds`, or the stream goes quiet
between transactions — whichever comes first, so a busy stream gets large batches and
a quiet one low latency. When the pipeline is full, reading pauses (back-pressure
lands on the WAL) while status updates keep the walsender from timing out. The flush
LSN sent to the server is only ever the checkpoint of a committed apply transaction,
or — when nothing is pending — the server's own keepalive position, so idle tables
do not pin WAL. Connection loss and a busy slot are retried with backoff; anything
else stops the loop with its error.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg

from .apply import Applier, ApplyResult
from .assemble import TxnAssembler
from .changes import Batch, SourceChange, TxnEnd
from .errors import ReplicationConnectionError, RetryPolicy, classify
from .pgoutput import decode
from .pipeline import ApplyPipeline
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
    pending_interval: float = 5.0  # how often an idle worker retries pending embeddings


class StreamRunner:
    """Follows one slot until stopped. `make_applier` opens a fresh search-side applier."""

    def __init__(self, settings: RunnerSettings, make_applier: Callable[[], Applier], *,
                 tables: set[str] | None = None, retry: RetryPolicy | None = None,
                 on_batch: Callable[[ApplyResult, Batch], None] | None = None,
                 backfill: Callable[[Applier], Iterator[object]] | None = None,
                 log: Callable[..., None] | None = None) -> None:
        self.settings = settings
        self.make_applier = make_applier
        self.tables = tables
        self.retry = retry or RetryPolicy()
        self.on_batch = on_batch
        self.backfill = backfill
        self.log = log or (lambda event, **kw: None)
        self.stopping = threading.Event()
        self.flushed = 0
        self.ready = threading.Event()
        self.last_beat = time.monotonic()

    # -- control --------------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> None:
        """Run until `stop()`; retries what can be retried, raises what cannot."""
        attempt = 0
        while not self.stopping.is_set():
            try:
                self._run_once()
                return
            except (ReplicationConnectionError, psycopg.OperationalError, OSError) as exc:
                err = exc
            except Exception as exc:
                if classify(exc) != "retry":
                    raise
                err = exc
            self.ready.clear()
            decision = self.retry.decide(err if classify(err) == "retry" else
                                         ReplicationConnectionError(str(err)), attempt)
            if decision.action != "retry":
                raise err
            self.log("reconnecting", reason=str(err)[:300], delay_s=round(decision.delay, 2),
                     attempt=attempt, error=type(err).__name__)
            attempt += 1
            if self.stopping.wait(decision.delay):
                return

    # -- one connection's life ------------------------------------------------------------

    def _run_once(self) -> None:
        s = self.settings
        applier = self.make_applier()
        pipeline = ApplyPipeline(applier)
        heartbeat = _Heartbeat(s.source_dsn, s.heartbeat_seconds) if s.heartbeat_seconds > 0 else None
        try:
            with ReplicationConnection.connect(s.source_dsn, status_interval=s.status_interval) as conn:
                cp = applier.checkpoint
                conn.start_replication(s.slot, cp.lsn, publication_names=[s.publication],
                                       proto_version=1, messages=True)
                self.flushed = max(self.flushed, cp.lsn)
                if self.flushed:
                    conn.send_status(flushed=self.flushed)
                self.ready.set()
                self.log("streaming", slot=s.slot, start_lsn=cp.lsn)
                self._loop(conn, applier, pipeline)
        finally:
            pipeline.close()
            if heartbeat is not None:
                heartbeat.close()
            applier.close()

    def _loop(self, conn: ReplicationConnection, applier: Applier, pipeline: ApplyPipeline) -> None:
        s = self.settings
        assembler = TxnAssembler(applier.checkpoint, self.tables)
        batch, opened = Batch(), 0.0
        chore_running = False
        next_chore = time.monotonic() + s.pending_interval
        # Tables to copy while streaming: one chunk at a time, between batches, on the writer.
        steps = self.backfill(applier) if self.backfill is not None else None

        def collect(timeout: float = 0.0) -> None:
            nonlocal steps, chore_running
            for kind, value, done in pipeline.collect(timeout):  # re-raises an apply failure
                if kind == "chore":
                    chore_running = False
                    if value is _DONE:
                        steps = None
                    continue
                if value.checkpoint.lsn > self.flushed:
                    self.flushed = value.checkpoint.lsn
                    conn.send_status(flushed=self.flushed)
                if self.on_batch is not None:
                    self.on_batch(value, done)

        while True:
            self.last_beat = time.monotonic()
            collect()
            if self.stopping.is_set():
                while not pipeline.idle:
                    collect(timeout=0.5)
                conn.send_status()
                self.log("stopped", flushed_lsn=self.flushed, abandoned_changes=len(batch.changes))
                return
            now = time.monotonic()
            if pipeline.idle and not batch:
                if steps is not None:
                    chore_running = pipeline.submit(lambda: next(steps, _DONE))
                elif now >= next_chore:
                    chore_running = pipeline.submit(applier.fill_pending)
                    next_chore = now + s.pending_interval
            full = len(batch.changes) >= s.max_changes or batch.bytes >= s.max_bytes
            due = bool(batch) and now - opened >= s.max_seconds
            if (full or due) and not chore_running:
                batch.partial = assembler.position() if assembler.in_transaction else None
                if pipeline.submit(batch):
                    batch = Batch()
                    continue
            if full or (due and chore_running):
                # Back-pressure: stop reading until the pipeline takes the batch; keep the
                # walsender's timeout at bay meanwhile.
                collect(timeout=min(1.0, s.status_interval / 2))
                conn.send_status()
                continue
            busy = not pipeline.idle
            timeout = 1.0 if not batch else max(0.0, min(opened + s.max_seconds - now, IDLE_FLUSH))
            if busy:
                timeout = min(timeout, 0.002)
            message = conn.read_message(timeout=timeout)
            if message is None:
                if batch and not assembler.in_transaction:
                    opened = 0.0  # the stream went quiet between transactions: apply now
                continue
            if isinstance(message, Keepalive):
                idle = not batch and pipeline.idle and not assembler.in_transaction
                if idle and message.wal_end > self.flushed:
                    self.flushed = message.wal_end
                    conn.send_status(flushed=self.flushed)
                continue
            if isinstance(message, XLogData):
                for item in assembler.feed(decode(message.payload)):
                    if not batch:
                        opened = time.monotonic()
                    if isinstance(item, TxnEnd):
                        batch.completed.append(item)
                    else:
                        _add(batch, item)


_DONE = object()
IDLE_FLUSH = 0.001  # a batch whose stream has been quiet this long is applied without waiting


def _add(batch: Batch, change: SourceChange) -> None:
    batch.changes.append(change)
    batch.bytes += change.approx_bytes


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
