"""The worker's Prometheus metrics, the canonical per-batch log line, and slot lag.

This module owns:

* `Metrics`: every metric the worker exports, in a `CollectorRegistry` of its own
  (never the global one), so tests and several workers in one process do not clash.
  The README's metrics table lists exactly these; `tests/test_docs.py` compares them.
* `BatchLog`: the one canonical log line per applied batch (event `batch_applied`)
  and the metric updates that go with it.
* `lag_from_slot()` and `MetricsPoller`: how far the replication slot trails the
  server's WAL, in bytes, read from the server on a timer.

Nothing here opens a connection or starts a thread at import time.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from slipstream.index.errors import ValidationError

from .lsn import format_lsn, parse_lsn

__all__ = ["BatchLog", "Metrics", "MetricsPoller", "SlotLag", "lag_from_slot"]

# --- metrics -------------------------------------------------------------------------

#: 1 ms .. 10 s in 1-2.5-5 steps per decade: the range an apply transaction spans.
APPLY_SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Changes per batch, 1 .. 10 000.
BATCH_CHANGES_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
#: Source commit to apply commit: milliseconds when streaming, up to an hour when
#: catching up after an outage.
COMMIT_TO_APPLY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip

OPS = ("upsert", "delete")
RATE_WINDOW_SECONDS = 30.0


class Metrics:
    """The worker's Prometheus metrics, registered in a registry this instance owns.

    Metric names carry the `slipstream_` prefix; attributes drop it. Use the
    attributes directly (`m.reconnects_total.labels(reason="timeout").inc()`), or the
    two helpers below for the cases that need a rule.
    """

    def __init__(self, *, namespace: str = "slipstream") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        own = {"namespace": namespace, "registry": self.registry}
        self.slot_lag_bytes = Gauge(
            "slot_lag_bytes",
            "WAL bytes between the server's current LSN and the slot's confirmed flush LSN.",
            **own,
        )
        self.slot_lag_seconds = Gauge(
            "slot_lag_seconds",
            "Seconds between the source commit of the last applied transaction and its apply.",
            **own,
        )
        self.applied_changes_total = Counter(
            "applied_changes_total", "Row changes applied to the index, by operation.", ["op"],
            **own,
        )  # fmt: skip
        self.applied_transactions_total = Counter(
            "applied_transactions_total", "Source transactions applied to the index.", **own
        )
        self.apply_batch_seconds = Histogram(
            "apply_batch_seconds", "Wall time to apply one batch, commit included.",
            buckets=APPLY_SECONDS_BUCKETS, **own,
        )  # fmt: skip
        self.batch_changes = Histogram(
            "batch_changes", "Row changes per applied batch.", buckets=BATCH_CHANGES_BUCKETS,
            **own,
        )  # fmt: skip
        self.dead_letters_total = Counter(
            "dead_letters_total", "Changes sent to the dead-letter table, by source table.",
            ["table"], **own,
        )  # fmt: skip
        self.pending_embeddings = Gauge(
            "pending_embeddings", "Live rows indexed lexically only, waiting for a vector, by space.",
            ["space"], **own,
        )  # fmt: skip
        self.ann_queue_rows = Gauge(
            "ann_queue_rows",
            "Rows written but not yet in the HNSW side tables (searched exactly meanwhile).",
            **own,
        )
        self.checkpoint_lsn = Gauge(
            "checkpoint_lsn",
            "Source LSN covered by the last committed apply transaction (exact up to 2**53).",
            **own,
        )
        self.reconnects_total = Counter(
            "reconnects_total", "Replication reconnects, by the type of error that caused them.",
            ["reason"], **own,
        )  # fmt: skip
        self.apply_rate = Gauge(
            "apply_rate",
            f"Row changes applied per second, over the last {RATE_WINDOW_SECONDS:g} seconds.",
            **own,
        )
        self.snapshot_rows_total = Counter(
            "snapshot_rows_total", "Rows copied by the initial snapshot, by source table.",
            ["table"], **own,
        )  # fmt: skip
        self.commit_to_apply_seconds = Histogram(
            "commit_to_apply_seconds", "Source commit timestamp to apply commit, per transaction.",
            buckets=COMMIT_TO_APPLY_BUCKETS, **own,
        )  # fmt: skip
        for op in OPS:  # both series exist from the start, so rate() sees the first change
            self.applied_changes_total.labels(op=op)
        self._init_embedding_metrics(own)

    def count_changes(self, op: str, n: int = 1) -> None:
        """Add `n` applied changes of operation `op` ('upsert' or 'delete')."""
        if op not in OPS:
            raise ValidationError(f"op must be one of {', '.join(OPS)}, not {op!r}")
        self.applied_changes_total.labels(op=op).inc(n)

    def observe_commit(self, commit_ts: datetime, applied_at: datetime | None = None) -> float:
        """Record one transaction's source-commit-to-apply delay; returns it in seconds.

        `commit_ts` is the pgoutput commit timestamp (aware UTC). Clock skew between
        the source and this host can make the difference negative; it counts as 0.
        """
        applied_at = applied_at or datetime.now(UTC)
        delay = max(0.0, (applied_at - commit_ts).total_seconds())
        self.commit_to_apply_seconds.observe(delay)
        return delay

    def set_pending(self, by_space: Mapping[str, int]) -> None:
        """Rows waiting for a vector, per space (`pending_embeddings{space=...}`)."""
        for space, n in by_space.items():
            self.pending_embeddings.labels(space=space).set(n)

    # --- embedding metrics (one block: requests, texts, cache, retries, breaker) --------

    def _init_embedding_metrics(self, own: dict[str, Any]) -> None:
        """Embedding metrics, every one labelled by space."""
        self.embed_requests_total = Counter(
            "embed_requests_total", "Requests to an embedding service, by space and outcome "
            "(ok, retry, failed, rejected, open: refused by the open circuit).",
            ["space", "outcome"], **own)
        self.embed_texts_total = Counter(
            "embed_texts_total", "Texts sent to an embedding service.", ["space"], **own)
        self.embed_tokens_total = Counter(
            "embed_tokens_total", "Estimated tokens sent to an embedding service.", ["space"],
            **own)
        self.embed_request_seconds = Histogram(
            "embed_request_seconds", "Latency of one embedding request (each attempt).",
            ["space"], buckets=EMBED_SECONDS_BUCKETS, **own)
        self.embed_retries_total = Counter(
            "embed_retries_total", "Embedding requests retried, by space and reason "
            "(429, 5xx, timeout, connection).", ["space", "reason"], **own)
        self.embed_failures_total = Counter(
            "embed_failures_total", "Embedding calls that left rows pending, by space and reason.",
            ["space", "reason"], **own)
        self.embed_truncations_total = Counter(
            "embed_truncations_total", "Texts cut to the model's input limit before sending.",
            ["space"], **own)
        self.embed_circuit_state = Gauge(
            "embed_circuit_state", "Circuit breaker per space: 0 closed, 1 half-open, 2 open.",
            ["space"], **own)
        self.embed_cache_total = Counter(
            "embed_cache_total", "Embedding lookups avoided or not, by space and result: "
            "reused (the row's text is unchanged), hit (the content-hash cache had it), "
            "miss (sent to the embedder).", ["space", "result"], **own)
        self.embed_noop_updates_total = Counter(
            "embed_noop_updates_total", "Updates that changed nothing a device sees: no search "
            "row write, no change-log entry.", **own)

    def index_event(self, event: str, space: str, n: int) -> None:
        """The `SearchIndex` observer: counts its embedding events (see `SearchIndex`)."""
        if event in ("reused", "hit", "miss"):
            self.embed_cache_total.labels(space=space, result=event).inc(n)
        elif event == "noop":
            self.embed_noop_updates_total.inc(n)
        elif event == "failed":
            self.embed_failures_total.labels(space=space, reason="error").inc(n)
        elif event == "wrong_shape":
            self.embed_failures_total.labels(space=space, reason="wrong_shape").inc(n)
        elif event == "pending":  # a count, not an increment (n may be 0)
            self.set_pending({space: n})

    def render(self) -> bytes:
        """All metrics in the Prometheus text exposition format (`CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)


EMBED_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# --- one line per batch --------------------------------------------------------------


class BatchLog:
    """Emits the canonical `batch_applied` line and updates `metrics` to match.

    Call `log_batch()` once per batch, after its apply transaction has committed, so
    that `last_lsn` is what the checkpoint now holds.
    """

    def __init__(self, metrics: Metrics, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self._clock = clock
        self._recent: deque[tuple[float, int]] = deque()  # (when, changes) within the window
        self._recent_sum = 0  # the changes in `_recent`, kept as it moves (no sum per batch)

    def log_batch(
        self,
        logger: Any,
        *,
        transactions: int,
        changes: int,
        bytes: int,  # the field's name in the log line
        lag_bytes: int | None,
        lag_seconds: float | None,
        duration_s: float,
        first_lsn: int,
        last_lsn: int,
        ops: Mapping[str, int] | None = None,
    ) -> None:
        """One log line, one metrics update. `ops` ({'upsert': n, 'delete': m}) is optional
        and feeds `applied_changes_total`; without it only the totals are logged."""
        m = self.metrics
        m.applied_transactions_total.inc(transactions)
        m.batch_changes.observe(changes)
        m.apply_batch_seconds.observe(duration_s)
        m.checkpoint_lsn.set(last_lsn)
        if lag_bytes is not None:
            m.slot_lag_bytes.set(lag_bytes)
        if lag_seconds is not None:
            m.slot_lag_seconds.set(lag_seconds)
        for op, n in (ops or {}).items():
            m.count_changes(op, n)
        m.apply_rate.set(self._rate(changes))
        logger.info(
            "batch_applied",
            transactions=transactions,
            changes=changes,
            bytes=bytes,
            lag_bytes=lag_bytes,
            lag_seconds=None if lag_seconds is None else round(lag_seconds, 3),
            duration_s=round(duration_s, 6),
            first_lsn=format_lsn(first_lsn),
            last_lsn=format_lsn(last_lsn),
            **({"ops": dict(ops)} if ops else {}),
        )


    def _rate(self, changes: int) -> float:
        """Changes per second over the last `RATE_WINDOW_SECONDS`, this batch included."""
        now = self._clock()
        self._recent.append((now, changes))
        self._recent_sum += changes
        while self._recent[0][0] < now - RATE_WINDOW_SECONDS:
            self._recent_sum -= self._recent.popleft()[1]
        span = max(now - self._recent[0][0], 1.0)  # one batch alone: per its first second
        return self._recent_sum / span


# --- slot lag ------------------------------------------------------------------------


class SlotLag(NamedTuple):
    """A slot's position against the server's WAL. LSNs are ints (see `lsn.py`).

    `lag_bytes` and `confirmed_flush_lsn` are None for a physical slot or a logical
    slot still being created; `wal_status` is 'reserved', 'extended', 'unreserved' or
    'lost' (lost: the WAL the slot needs is gone, and it must be recreated).
    """

    lag_bytes: int | None
    confirmed_flush_lsn: int | None
    restart_lsn: int | None
    active: bool
    wal_status: str | None


# On a standby (logical slots there exist since Postgres 16) pg_current_wal_lsn()
# raises; the replayed position is the one the slot trails.
_SLOT_LAG_SQL = """
SELECT pg_wal_lsn_diff(
           CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                ELSE pg_current_wal_lsn() END,
           confirmed_flush_lsn)::bigint,
       confirmed_flush_lsn::text,
       restart_lsn::text,
       active,
       wal_status
  FROM pg_replication_slots
 WHERE slot_name = %s
"""


def lag_from_slot(conn: Any, slot_name: str) -> SlotLag | None:
    """Read `slot_name`'s lag from `pg_replication_slots`; None if there is no such slot.

    `conn` is an ordinary (not replication) psycopg connection. The query runs in a
    transaction block of its own (a savepoint if the caller has one open), so a
    non-autocommit connection is not left idle in transaction.

    The lag is measured to `pg_current_wal_lsn()`, the WAL written out so far (WAL
    still in the server's buffers does not count). With `synchronous_commit = off` a
    commit shows up there only once the WAL writer has run (within `wal_writer_delay`).
    """
    with conn.transaction():
        row = conn.execute(_SLOT_LAG_SQL, (slot_name,)).fetchone()
    if row is None:
        return None
    lag, confirmed, restart, active, wal_status = row
    return SlotLag(
        lag_bytes=None if lag is None else int(lag),
        confirmed_flush_lsn=None if confirmed is None else parse_lsn(confirmed),
        restart_lsn=None if restart is None else parse_lsn(restart),
        active=bool(active),
        wal_status=wal_status,
    )


class MetricsPoller:
    """Reads the slot's lag and the pending embeddings on a timer and feeds the gauges.

    Runs on a daemon thread from `start()` to `stop()`, every `interval` seconds:
    `read_lag()` (usually `lag_from_slot` on a fresh source connection) sets
    `slot_lag_bytes`; `read_pending()` ({space: rows}) sets `pending_embeddings`;
    `read_ann()` (rows) sets `ann_queue_rows`. A
    failing read is logged and tried again at the next tick: the stream's own loop
    reports connection trouble. `latest` is the last slot reading, for the batch log
    line. `spaces` are exported (as 0) from the start. When the server has invalidated
    the slot (`wal_status = 'lost'`), `on_lost` is called once with the reading; the
    worker stops on it.
    """

    def __init__(
        self,
        metrics: Metrics,
        read_lag: Callable[[], SlotLag | None],
        *,
        read_pending: Callable[[], Mapping[str, int]] | None = None,
        read_ann: Callable[[], int] | None = None,
        on_lost: Callable[[SlotLag], None] | None = None,
        spaces: Iterable[str] = (),
        interval: float = 5.0,
        log: Any = None,
    ) -> None:
        if interval <= 0:
            raise ValidationError(f"interval must be > 0 seconds, not {interval!r}")
        self.metrics = metrics
        self.read_lag, self.read_pending, self.on_lost = read_lag, read_pending, on_lost
        self.read_ann = read_ann
        self.interval = interval
        self.log = log
        self.latest: SlotLag | None = None
        self._spaces: set[str] = set(spaces)  # exported as 0 until rows are pending
        metrics.set_pending(dict.fromkeys(self._spaces, 0))
        self._lost_reported = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> None:
        """One reading of everything, now (the thread calls it every `interval`)."""
        try:
            lag = self.read_lag()
        except Exception as exc:  # noqa: BLE001 - a metrics read must never stop the worker
            self._warn("slot_lag_read_failed", exc)
        else:
            self.latest = lag
            if lag is not None and lag.lag_bytes is not None:
                self.metrics.slot_lag_bytes.set(lag.lag_bytes)
            if lag is not None and lag.wal_status == "unreserved" and self.log is not None:
                self.log.warning("slot_wal_unreserved", lag_bytes=lag.lag_bytes,
                                 hint="the slot is about to lose WAL it needs "
                                      "(max_slot_wal_keep_size); the worker must catch up")
            if (lag is not None and lag.wal_status == "lost" and self.on_lost is not None
                    and not self._lost_reported):
                self._lost_reported = True
                self.on_lost(lag)
        if self.read_ann is not None:
            try:
                self.metrics.ann_queue_rows.set(self.read_ann())
            except Exception as exc:  # noqa: BLE001
                self._warn("ann_queue_read_failed", exc)
        if self.read_pending is None:
            return
        try:
            pending = dict(self.read_pending())
        except Exception as exc:  # noqa: BLE001
            self._warn("pending_read_failed", exc)
            return
        self._spaces |= set(pending)
        # A space with none left goes back to 0.
        self.metrics.set_pending({space: pending.get(space, 0) for space in self._spaces})

    def _warn(self, event: str, exc: BaseException) -> None:
        if self.log is not None:
            self.log.warning(event, error=f"{type(exc).__name__}: {exc}"[:300])

    def _run(self) -> None:
        while True:
            self.poll()
            if self._stop.wait(self.interval):
                return

    def start(self) -> MetricsPoller:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="slipstream-metrics-poller",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
