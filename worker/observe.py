"""What the worker tells operators, in one import: logs, metrics, health endpoints, slot lag.

The pieces live in `logs` (structlog set-up), `metrics` (Prometheus metrics, the
per-batch log line, slot lag) and `health` (the HTTP endpoints); this module only
gathers their public names for callers that want all of them.
"""

from __future__ import annotations

from .health import HealthServer, HealthServerError
from .logs import configure_logging, get_logger
from .metrics import BatchLog, Metrics, MetricsPoller, SlotLag, lag_from_slot

__all__ = [
    "BatchLog",
    "HealthServer",
    "HealthServerError",
    "Metrics",
    "MetricsPoller",
    "SlotLag",
    "configure_logging",
    "get_logger",
    "lag_from_slot",
]
