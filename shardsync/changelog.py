"""The change log: its tables, how the worker appends to it, and who may write it.

``{schema}.changes(seq, partition, object_type, object_id, node_kind, op, source_lsn,
recorded_at)`` holds keys only: one row per effect on a search row, ``op`` ``u``
(upsert) or ``d`` (tombstone in that partition). The row's content is its current
state in ``{schema}.docs``. ``seq`` is assigned by the single apply writer in source
commit order, so a reader's snapshot always sees a gap-free prefix of the log.

This module owns, in the search schema:

* ``changes`` — the log (created by the worker's first migration in databases made
  before this module existed; `migrate` keeps those working unchanged);
* ``changelog_writer`` — the one replication slot allowed to append (`claim`);
* ``changelog_horizon`` — the highest seq whose entries compaction may have removed:
  a cursor below it cannot be served by deltas (`ResyncRequired`).

`append` runs inside the worker's apply transaction and ``NOTIFY``s `ChangeLog.channel`
with the new last seq, so a waiting sync server wakes when the transaction commits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql
from slipstream.index.doc import check_identifier
from slipstream.index.errors import ValidationError
from slipstream.index.pg_migrations import apply_migrations

from .errors import SlotConflictError

COPY_MIN_ROWS = 64  # appends at least this long go through COPY

_MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "change log", """
CREATE TABLE IF NOT EXISTS {s}.changes (
    seq bigint PRIMARY KEY,
    partition text NOT NULL,
    object_type text NOT NULL,
    object_id text NOT NULL,
    node_kind text NOT NULL,
    op char(1) NOT NULL CHECK (op IN ('u', 'd')),
    source_lsn pg_lsn,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS changes_partition_seq ON {s}.changes (partition, seq);
CREATE TABLE {s}.changelog_writer (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    slot text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE {s}.changelog_horizon (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    horizon bigint NOT NULL DEFAULT 0,
    compacted_at timestamptz
);
INSERT INTO {s}.changelog_horizon (horizon) VALUES (0);
"""),
]


@dataclass(frozen=True, slots=True)
class ChangeEntry:
    """One log entry to append: `op` is ``u`` or ``d`` for the key in `partition`."""

    partition: str
    object_type: str
    object_id: str
    node_kind: str
    op: str
    source_lsn: int


def _lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def channel_name(schema: str) -> str:
    """The NOTIFY channel of a schema's change log (a plain identifier, under 64 bytes)."""
    name = f"slipstream_changes_{schema}"
    if len(name.encode()) > 63:
        name = "slipstream_changes_" + hashlib.sha256(schema.encode()).hexdigest()[:24]
    return name


SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"


def check_idle(conn: psycopg.Connection | psycopg.AsyncConnection) -> None:
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise ValidationError(
            "a consistent read needs a connection with no open transaction; commit or roll "
            "back first, or pass an autocommit connection")


@contextmanager
def read_snapshot(conn: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """One REPEATABLE READ, READ ONLY transaction on `conn`: every read inside sees one snapshot.

    `conn` must have no transaction open (autocommit, or idle)."""
    check_idle(conn)
    with conn.transaction():
        conn.execute(SNAPSHOT)
        yield conn


class ChangeLog:
    """The change log of the search schema `schema`."""

    def __init__(self, schema: str = "slipstream") -> None:
        self.schema = check_identifier(schema, "schema")
        self._s = sql.Identifier(self.schema)
        self.channel = channel_name(self.schema)
        self._append_sql: bytes | None = None

    def q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(s=self._s)

    def migrate(self, conn: psycopg.Connection) -> None:
        """Create or upgrade the change-log tables. Idempotent; serialised by an advisory lock."""
        with conn.transaction():
            apply_migrations(conn, self.schema, "changelog_migrations", _MIGRATIONS)

    # -- the writer -----------------------------------------------------------------------

    def claim(self, conn: psycopg.Connection, slot_name: str) -> None:
        """Record `slot_name` as the one slot appending to this log, or raise
        `SlotConflictError` when another slot holds it. Runs in the caller's transaction
        when one is open (the claim is durable when it commits)."""
        with conn.transaction():
            conn.execute(self.q(
                "INSERT INTO {s}.changelog_writer (slot) VALUES (%s) ON CONFLICT (one) DO NOTHING"),
                (slot_name,))
            (owner,) = conn.execute(self.q("SELECT slot FROM {s}.changelog_writer")).fetchone()
        if owner != slot_name:
            raise SlotConflictError(self.schema, owner, slot_name)

    def writer(self, conn: psycopg.Connection) -> str | None:
        """The slot that holds the claim, if any."""
        row = conn.execute(self.q("SELECT slot FROM {s}.changelog_writer")).fetchone()
        return row[0] if row else None

    def release(self, conn: psycopg.Connection, slot_name: str) -> bool:
        """Give up `slot_name`'s claim (after its slot was dropped for good); True if it held it."""
        with conn.transaction():
            return conn.execute(self.q("DELETE FROM {s}.changelog_writer WHERE slot = %s"),
                                (slot_name,)).rowcount > 0

    def append(self, conn: psycopg.Connection, entries: Sequence[ChangeEntry], *,
               first_seq: int | None = None) -> int:
        """Append `entries` with consecutive seqs from `first_seq` (default: after the last
        one) and notify `channel`; returns the last seq used. Call inside the transaction
        that writes the rows the entries describe."""
        if first_seq is None:
            first_seq = self.max_seq(conn) + 1
        if not entries:
            return first_seq - 1
        last = first_seq + len(entries) - 1
        rows = [(first_seq + i, e.partition, e.object_type, e.object_id, e.node_kind, e.op,
                 _lsn_text(e.source_lsn)) for i, e in enumerate(entries)]
        if len(rows) < COPY_MIN_ROWS:  # few rows: plain inserts, which also work in pipeline mode
            with conn.cursor() as cur:
                cur.executemany(self.q(
                    "INSERT INTO {s}.changes (seq, partition, object_type, object_id, node_kind, op, "
                    "source_lsn) VALUES (%s, %s, %s, %s, %s, %s, %s)"), rows)
        else:
            with conn.cursor().copy(self.q(
                    "COPY {s}.changes (seq, partition, object_type, object_id, node_kind, op, "
                    "source_lsn) FROM STDIN")) as copy:
                for row in rows:
                    copy.write_row(row)
        conn.execute("SELECT pg_notify(%s, %s)", (self.channel, str(last)))
        return last

    def append_statements(self, entries: Sequence[ChangeEntry], first_seq: int
                          ) -> list[tuple[bytes, list[object]]]:
        """What `append` runs for a few entries, as (query, params) for a caller that sends
        its whole transaction as one query: one multi-row insert, then the notification."""
        if not entries:
            return []
        if self._append_sql is None:
            self._append_sql = self.q(
                "INSERT INTO {s}.changes (seq, partition, object_type, object_id, node_kind, op, "
                "source_lsn) VALUES ").as_bytes(None)
        params: list[object] = []
        for i, e in enumerate(entries):
            params += (first_seq + i, e.partition, e.object_type, e.object_id, e.node_kind, e.op,
                       _lsn_text(e.source_lsn))
        last = first_seq + len(entries) - 1
        return [(self._append_sql + b", ".join([b"(%s, %s, %s, %s, %s, %s, %s)"] * len(entries)),
                 params), (b"SELECT pg_notify(%s, %s)", [self.channel, str(last)])]

    # -- positions ------------------------------------------------------------------------

    _MAX_SEQ = ("SELECT greatest((SELECT coalesce(max(seq), 0) FROM {s}.changes), "
                "(SELECT coalesce(max(horizon), 0) FROM {s}.changelog_horizon))")
    _BETWEEN = "SELECT DISTINCT partition FROM {s}.changes WHERE seq > %s AND seq <= %s"

    def max_seq(self, conn: psycopg.Connection) -> int:
        """The last seq visible to `conn` (never below the horizon, even when compaction
        removed the newest entries)."""
        (seq,) = conn.execute(self.q(self._MAX_SEQ)).fetchone()
        return int(seq)

    async def max_seq_async(self, conn: psycopg.AsyncConnection) -> int:
        """`max_seq` on an async connection."""
        (seq,) = await (await conn.execute(self.q(self._MAX_SEQ))).fetchone()
        return int(seq)

    def partitions_between(self, conn: psycopg.Connection, after: int, upto: int) -> frozenset[str]:
        """The partitions that have entries with `after` < seq <= `upto`."""
        rows = conn.execute(self.q(self._BETWEEN), (after, upto)).fetchall()
        return frozenset(r[0] for r in rows)

    async def partitions_between_async(self, conn: psycopg.AsyncConnection, after: int,
                                       upto: int) -> frozenset[str]:
        """`partitions_between` on an async connection."""
        rows = await (await conn.execute(self.q(self._BETWEEN), (after, upto))).fetchall()
        return frozenset(r[0] for r in rows)

    def partition_versions(self, conn: psycopg.Connection,
                           partitions: Sequence[str]) -> tuple[int, int, tuple[int, ...]]:
        """(the log table's identity, horizon, highest seq logged per partition in the given
        order, 0 for none) in one query: an index-only lookup per partition. A partition's
        rows are as they were while this is unchanged (see ``slipstream.index.scope_cache``);
        the identity tells a log recreated after a reset from the one it replaced."""
        ident, horizon, seqs = conn.execute(self.q(
            "SELECT to_regclass('{s}.changes')::oid::bigint, "
            "(SELECT coalesce(max(horizon), 0) FROM {s}.changelog_horizon), "
            "array(SELECT coalesce((SELECT max(c.seq) FROM {s}.changes c WHERE c.partition = p.name), 0) "
            "FROM unnest(%s::text[]) WITH ORDINALITY AS p(name, i) ORDER BY p.i)"),
            (list(partitions),)).fetchone()
        return int(ident), int(horizon), tuple(int(x) for x in seqs)

    def horizon(self, conn: psycopg.Connection) -> int:
        """Entries at or below this seq may have been compacted away; a cursor below it
        must resync."""
        row = conn.execute(self.q("SELECT horizon FROM {s}.changelog_horizon")).fetchone()
        return int(row[0]) if row else 0

    def raise_horizon(self, conn: psycopg.Connection, seq: int) -> int:
        """Move the horizon up to `seq` (never down); returns the horizon now recorded."""
        (horizon,) = conn.execute(self.q(
            "UPDATE {s}.changelog_horizon SET horizon = greatest(horizon, %s), compacted_at = now() "
            "RETURNING horizon"), (seq,)).fetchone()
        return int(horizon)
