"""What the worker tells operators: logs, metrics, health endpoints and slot lag.

This module owns:

* `configure_logging()` / `get_logger()`: structlog's production set-up (structlog's
  docs/performance.md) — JSON lines on stdout, flushed per line, ISO UTC timestamps,
  level filtering in the bound logger, loggers cached on first use. Records from the
  standard library's `logging` (psycopg, `slipstream.index`) are rendered into the
  same stream, so a log shipper sees one format.
* `Metrics`: every Prometheus metric the worker exports, in a `CollectorRegistry` of
  its own (never the global one), so tests and several workers in one process do
  not clash.
* `BatchLog`: the one canonical log line per applied batch (event `batch_applied`)
  and the metric updates that go with it.
* `HealthServer`: `/metrics`, `/healthz` (liveness) and `/readyz` (readiness) over a
  stdlib threaded HTTP server in a daemon thread.
* `lag_from_slot()`: how far a replication slot trails the server's WAL, in bytes.

Nothing here opens a connection or binds a port at import time.
"""

from __future__ import annotations

import json as _json
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, NamedTuple, Self
from urllib.parse import urlsplit

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from slipstream.index.errors import ConfigurationError, SlipstreamError, ValidationError
from slipstream.worker.lsn import format_lsn, parse_lsn

__all__ = [
    "BatchLog",
    "HealthServer",
    "HealthServerError",
    "Metrics",
    "SlotLag",
    "configure_logging",
    "get_logger",
    "lag_from_slot",
]

# --- logging -------------------------------------------------------------------------

_LEVELS = ("debug", "info", "warning", "error", "critical")


def _level_number(level: str) -> int:
    name = level.strip().lower() if isinstance(level, str) else None
    if name not in _LEVELS:
        raise ConfigurationError(
            f"log level {level!r} is not one of {', '.join(_LEVELS)}; set level= to one of them"
        )
    return logging.getLevelNamesMapping()[name.upper()]


# One lock for every line this module writes, from structlog or stdlib logging, so
# lines from different threads never interleave.
_WRITE_LOCK = threading.Lock()


def _write_line(line: str) -> None:
    # sys.stdout is looked up per line, not held: a logger cached on first use stays
    # valid when stdout is replaced (pytest's capture, a daemon redirecting it).
    with _WRITE_LOCK:
        stream = sys.stdout
        stream.write(line + "\n")
        stream.flush()  # unbuffered in effect: a crash loses no line


class _StdoutLogger:
    """structlog's `WriteLogger` to stdout, plus a `name` for `add_logger_name`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def msg(self, message: str) -> None:
        _write_line(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


def _logger_factory(*args: Any) -> _StdoutLogger:
    return _StdoutLogger(str(args[0]) if args else "slipstream")


class _StdoutHandler(logging.Handler):
    """Hands stdlib records, rendered by structlog's ProcessorFormatter, to `_write_line`."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write_line(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def configure_logging(*, json: bool = True, level: str = "info") -> None:
    """Set up structlog (and route stdlib `logging`) for this process; safe to call again.

    `json=True` renders one JSON object per line, e.g.
    `{"event": "batch_applied", "level": "info", "timestamp": "2025-01-01T12:00:00.000001Z", ...}`;
    `json=False` renders aligned, human-readable lines (colours only on a terminal).

    Calling it again replaces the configuration, never adds a second handler. Loggers
    are cached on first use (structlog's advice for speed), so a logger already used
    keeps the configuration it was built with: configure once, at start-up, before
    logging anything.
    """
    threshold = _level_number(level)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    # JSON wants the traceback as a string field; the console renderer prints it itself.
    exc_processor = structlog.processors.format_exc_info if json else structlog.dev.set_exc_info
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    structlog.configure(
        cache_logger_on_first_use=True,
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.stdlib.add_logger_name,
            exc_processor,
            timestamper,
            renderer,
        ],
        logger_factory=_logger_factory,  # gets the name get_logger() passes
    )

    # Third-party and slipstream.index records go through stdlib logging; give them the
    # same renderer and stream. Replace our handler rather than stacking another.
    formatter = structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *([exc_processor] if json else []),
            renderer,
        ],
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
        ],
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdoutHandler)]:
        root.removeHandler(old)
    handler = _StdoutHandler()
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(threshold)


def get_logger(name: str) -> Any:
    """A structlog logger whose lines carry `logger=name`.

    Lazy: it may be created at module scope before `configure_logging()` runs and
    picks up the configuration at its first call.
    """
    return structlog.get_logger(name)


def _log() -> Any:
    # A fresh proxy per (rare) event rather than a module-level logger: a cached
    # module-level logger would freeze whatever configuration was active at its first
    # use, even one from before configure_logging().
    return get_logger(__name__)


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
            "pending_embeddings", "Rows indexed lexically only, waiting for a vector.", **own
        )
        self.checkpoint_lsn = Gauge(
            "checkpoint_lsn",
            "Source LSN covered by the last committed apply transaction (exact up to 2**53).",
            **own,
        )
        self.reconnects_total = Counter(
            "reconnects_total", "Replication reconnects, by reason.", ["reason"], **own
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

    def render(self) -> bytes:
        """All metrics in the Prometheus text exposition format (`CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)

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
        self._pending_by_space: dict[str, int] = {}
        self._pending_lock = threading.Lock()
        self.pending_embeddings_by_space = Gauge(
            "pending_embeddings_by_space", "Rows waiting for a vector, by space.", ["space"],
            **own)

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

    def set_pending(self, by_space: Mapping[str, int]) -> None:
        """Rows waiting for a vector, per space (and rows-times-spaces in total)."""
        with self._pending_lock:
            self._pending_by_space.update(by_space)
            for space, n in by_space.items():
                self.pending_embeddings_by_space.labels(space=space).set(n)
            self.pending_embeddings.set(sum(self._pending_by_space.values()))


EMBED_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# --- one line per batch --------------------------------------------------------------


class BatchLog:
    """Emits the canonical `batch_applied` line and updates `metrics` to match.

    Call `log_batch()` once per batch, after its apply transaction has committed, so
    that `last_lsn` is what the checkpoint now holds.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

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


# --- health and metrics over HTTP ----------------------------------------------------

Check = Callable[[], tuple[bool, str]]


class HealthServerError(SlipstreamError):
    """The health server could not bind its port, or was used before `start()`."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # seconds a client may take to send its request before we hang up
    server_version = "slipstream"

    def do_GET(self) -> None:  # http.server's naming
        app = self.server.app
        path = urlsplit(self.path).path
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, app.metrics.render())
        elif path == "/healthz":
            ok, reason = app.alive()
            self._send(200 if ok else 503, "text/plain; charset=utf-8", (reason + "\n").encode())
        elif path == "/readyz":
            ok, reason = app.ready()
            body = _json.dumps({"ready": ok, "reason": reason}).encode()
            self._send(200 if ok else 503, "application/json", body)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # stdlib's signature
        _log().debug("health_http", client=self.client_address[0], message=format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: HealthServer) -> None:
        self.app = app
        super().__init__(address, _Handler)


class HealthServer:
    """`GET /metrics`, `/healthz` and `/readyz` for one worker, on a daemon thread.

    Liveness is the `liveness` callable when given; otherwise a heartbeat: the worker's
    loop calls `beat()` each turn, and `/healthz` answers 503 once no beat has come for
    `stale_after` seconds (the clock starts at construction, so a slow start-up is
    alive until then). Readiness is `readiness()`; `(False, reason)` or an exception
    gives 503 and `{"ready": false, "reason": ...}`.

    `port=0` binds a free port; `.port` tells which after `start()`.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        readiness: Check,
        liveness: Check | None = None,
        stale_after: float = 60.0,
    ) -> None:
        if stale_after <= 0:
            raise ValidationError(f"stale_after must be > 0 seconds, not {stale_after!r}")
        self.metrics = metrics
        self.host, self._requested_port = host, port
        self._readiness, self._liveness = readiness, liveness
        self.stale_after = stale_after
        self._last_beat = time.monotonic()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """The worker's loop is alive; call it at least every `stale_after` seconds."""
        self._last_beat = time.monotonic()

    def alive(self) -> tuple[bool, str]:
        if self._liveness is not None:
            return _run_check(self._liveness, "liveness")
        silent = time.monotonic() - self._last_beat
        if silent > self.stale_after:
            return False, f"no heartbeat for {silent:.1f}s (stale after {self.stale_after:g}s)"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        return _run_check(self._readiness, "readiness")

    @property
    def port(self) -> int:
        if self._server is None:
            raise HealthServerError("the health server is not started; call start() first")
        return self._server.server_address[1]

    def start(self) -> Self:
        if self._server is not None:
            return self
        try:
            server = _Server((self.host, self._requested_port), self)
        except OSError as exc:
            raise HealthServerError(
                f"cannot serve health and metrics on {self.host}:{self._requested_port}: "
                f"{exc.strerror or exc}; choose a free port (0 picks one)"
            ) from exc
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"slipstream-health:{self.port}",
            daemon=True,
        )
        self._thread.start()
        _log().info("health_server_started", host=self.host, port=self.port)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _run_check(check: Check, what: str) -> tuple[bool, str]:
    """A probe's answer; a probe that raises counts as failing, with the error as reason."""
    try:
        ok, reason = check()
    except Exception as exc:  # noqa: BLE001 - a broken probe means not ready, not a crash
        _log().warning(f"{what}_check_failed", error=repr(exc))
        return False, f"{what} check raised {type(exc).__name__}: {exc}"
    return bool(ok), str(reason)


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
