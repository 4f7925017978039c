"""The worker's log output: structlog's production set-up, one stream for every record.

This module owns `configure_logging()` and `get_logger()`: JSON lines on stdout,
flushed per line, ISO UTC timestamps, level filtering in the bound logger, loggers
cached on first use (structlog's docs/performance.md). Records from the standard
library's `logging` (psycopg, `slipstream.index`) are rendered into the same stream,
so a log shipper sees one format. Global state, as logging always is; nothing else
in the worker is.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import structlog
from slipstream.index.errors import ConfigurationError

__all__ = ["configure_logging", "get_logger"]

# --- set-up -------------------------------------------------------------------------

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

