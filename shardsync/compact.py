"""Change-log compaction: drop superseded entries, purge old tombstones, record the horizon.

`compact` runs in one transaction (serialised per schema by an advisory lock), beside
a running worker:

1. **Superseded entries.** For each (key, partition) only the last entry matters to a
   reader (pages carry a row's current content), so every earlier one is removed. A
   reader at any cursor sees the same pages' effect afterwards: no horizon move.
2. **Old tombstones.** A ``d`` entry recorded more than `retention` ago is removed
   from the log, and tombstoned ``docs`` rows last written more than `retention` ago
   are removed from the search table. A device whose cursor is below such an entry
   would miss the delete, so the horizon rises to the highest seq removed: cursors
   below it get `ResyncRequired` and take a new snapshot.

Run it on a schedule from the worker, or with ``slipstream compact``. A device that
syncs at least once per `retention` never has to resync.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import psycopg
from psycopg import sql
from slipstream.index.errors import ValidationError

from .changelog import ChangeLog

DEFAULT_RETENTION = timedelta(days=7)


@dataclass(frozen=True, slots=True)
class CompactionReport:
    """What one compaction removed, and the horizon afterwards."""

    superseded: int
    tombstones: int
    docs_purged: int
    horizon: int
    seconds: float


def check_retention(retention: timedelta | float) -> timedelta:
    if isinstance(retention, bool):
        raise ValidationError("retention must be a timedelta or a number of seconds")
    if isinstance(retention, int | float):
        retention = timedelta(seconds=retention)
    if not isinstance(retention, timedelta) or retention < timedelta(0):
        raise ValidationError(f"retention must be a non-negative duration, got {retention!r}")
    return retention


def compact(conn: psycopg.Connection, schema: str = "slipstream",
            retention: timedelta | float = DEFAULT_RETENTION) -> CompactionReport:
    """Compact `schema`'s change log (see the module docstring). `conn` must have no
    open transaction; the work commits as one transaction."""
    log = ChangeLog(schema)
    keep = check_retention(retention)
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise ValidationError("compact needs a connection with no open transaction")
    started = time.perf_counter()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"slipstream-compact:{log.schema}",))
        superseded = conn.execute(log.q(
            "DELETE FROM {s}.changes c USING ("
            " SELECT object_type, object_id, node_kind, partition, max(seq) AS last"
            " FROM {s}.changes GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) l "
            "WHERE c.object_type = l.object_type AND c.object_id = l.object_id "
            "AND c.node_kind = l.node_kind AND c.partition = l.partition AND c.seq < l.last")).rowcount
        (tombstones, last_purged) = conn.execute(log.q(
            "WITH gone AS (DELETE FROM {s}.changes WHERE op = 'd' AND recorded_at < now() - %s "
            "RETURNING seq) SELECT count(*), coalesce(max(seq), 0) FROM gone"), (keep,)).fetchone()
        docs_purged = conn.execute(sql.SQL(
            "DELETE FROM {s}.docs WHERE deleted AND updated_at < now() - %s").format(
                s=sql.Identifier(log.schema)), (keep,)).rowcount
        horizon = log.raise_horizon(conn, int(last_purged))
    return CompactionReport(superseded, int(tombstones), docs_purged, horizon,
                            time.perf_counter() - started)
