"""What the worker tells operators: logs and metrics.

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

Nothing here has side effects at import time.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from slipstream.index.errors import ConfigurationError, ValidationError
from slipstream.worker.lsn import format_lsn

__all__ = [
    "BatchLog",
    "Metrics",
    "configure_logging",
    "get_logger",
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
