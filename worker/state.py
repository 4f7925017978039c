"""The worker's durable state, beside the search table in the search schema.

* ``checkpoints`` — per slot: the end LSN of the last source transaction fully
  applied, the position inside a transaction that is partly applied (its commit LSN
  and how many of its changes are done), and the last change-log sequence number.
  It is written in the same transaction as the search rows it covers (guarantee 1).
* the change log, owned by `slipstream.shardsync.changelog` (`WorkerState.changelog`):
  the apply transaction appends to it, `migrate` creates it.
* ``source_rows`` — per source row: its last column values as text (to merge
  unchanged TOAST values, guarantee 6), the search rows it produced (to tombstone
  them on delete, move or truncate, guarantee 4), and the LSN that last wrote it.
* ``dead_letters`` — changes whose row could not be mapped, kept with the error.
* ``snapshot_progress`` — per table: how far the initial copy has got, and what it was
  read under (the table's OID, key columns and mapping), to copy it again when one changes.

Only one worker applies into a schema at a time: `claim_writer` takes a session
advisory lock and claims the change log for its slot, which is what makes the
sequence numbers gap-free in commit order.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from slipstream.index.doc import DocKey, check_identifier
from slipstream.index.errors import ConfigurationError
from slipstream.index.pg_embedding import FEW_KEYS
from slipstream.index.pg_migrations import apply_migrations
from slipstream.shardsync.changelog import ChangeEntry, ChangeLog

__all__ = ["ChangeEntry", "Checkpoint", "DeadLetter", "WorkerState"]

from .lsn import format_lsn, parse_lsn

_MIGRATIONS: list[tuple[int, str, str]] = [
    # The change log was created here before `shardsync.changelog` owned it; databases made
    # then already have it, and `ChangeLog.migrate` creates it (if missing) in new ones.
    (1, "worker state", """
CREATE TABLE {s}.checkpoints (
    slot text PRIMARY KEY,
    lsn pg_lsn NOT NULL DEFAULT '0/0',
    partial_lsn pg_lsn,
    partial_offset integer NOT NULL DEFAULT 0,
    last_seq bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE {s}.source_rows (
    relation text NOT NULL,
    row_key text NOT NULL,
    row_values jsonb,
    docs jsonb NOT NULL DEFAULT '[]',
    lsn pg_lsn NOT NULL,
    deleted boolean NOT NULL DEFAULT false,
    PRIMARY KEY (relation, row_key)
);
CREATE TABLE {s}.dead_letters (
    id bigserial PRIMARY KEY,
    source_lsn pg_lsn,
    relation text NOT NULL,
    row_key text,
    op text NOT NULL,
    row_values jsonb,
    error text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    retried_at timestamptz,
    resolved_at timestamptz
);
CREATE INDEX dead_letters_open ON {s}.dead_letters (id) WHERE resolved_at IS NULL;
CREATE TABLE {s}.snapshot_progress (
    relation text PRIMARY KEY,
    last_key jsonb,
    rows_copied bigint NOT NULL DEFAULT 0,
    read_lsn pg_lsn,
    done boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""),
    # The source table's OID at its copy: a table dropped and created again under the same
    # name is another table, whose rows must be copied again (`setup.reset_replaced`).
    (2, "snapshot_progress.relid", """
ALTER TABLE {s}.snapshot_progress ADD COLUMN IF NOT EXISTS relid oid
"""),
    # The key columns a row was identified by at the copy: when they change (another
    # primary key or replica identity index), the table's documents are keyed anew.
    (3, "snapshot_progress.key_columns", """
ALTER TABLE {s}.snapshot_progress ADD COLUMN IF NOT EXISTS key_columns text[]
"""),
    # What decided the table's documents at its copy (`Registry.fingerprint`): when the
    # configuration maps its rows otherwise, the table is copied again (`setup.reset_remapped`).
    (4, "snapshot_progress.mapping", """
ALTER TABLE {s}.snapshot_progress ADD COLUMN IF NOT EXISTS mapping text
"""),
    # A row has at most one open letter: a later change of it settles the ones before
    # (`WorkerState.settle_statement`), found by this index.
    (5, "dead_letters_open_rows", """
CREATE INDEX IF NOT EXISTS dead_letters_open_rows ON {s}.dead_letters (relation, row_key)
    WHERE resolved_at IS NULL
"""),
    # A table copied again because its slot was made anew (`setup.mark_resync`): its
    # rows stored before this WAL position and not read by the copy were deleted while
    # no slot recorded it, and the copy's last step tombstones them.
    (6, "snapshot_progress_resync", """
ALTER TABLE {s}.snapshot_progress ADD COLUMN IF NOT EXISTS resync_lsn pg_lsn
"""),
]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What is durably applied: everything up to `lsn`, plus `partial_offset` changes of
    the source transaction that commits at `partial_lsn` (when one is partly applied)."""

    lsn: int
    partial_lsn: int | None
    partial_offset: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    source_lsn: int | None
    relation: str
    row_key: str | None
    op: str
    row_values: dict[str, Any] | None
    error: str


@dataclass(frozen=True, slots=True)
class DocRef:
    """A search row a source row produced: its key and the partition it was logged in."""

    object_type: str
    object_id: str
    node_kind: str
    partition: str

    @property
    def key(self) -> DocKey:
        return (self.object_type, self.object_id, self.node_kind)

    def to_json(self) -> list[str]:
        return [self.object_type, self.object_id, self.node_kind, self.partition]

    @classmethod
    def from_json(cls, value: Sequence[str]) -> DocRef:
        return cls(*value)


@dataclass(frozen=True, slots=True)
class SourceState:
    """What the worker remembers of one source row (a `source_rows` row).

    `values` are its last column values as text (to merge unchanged TOAST values),
    `docs` the search rows it produced (to tombstone them on delete, move or
    truncate), `lsn` the source commit that last wrote it, `deleted` whether it is gone.
    """

    values: dict[str, Any] | None
    docs: tuple[DocRef, ...]
    lsn: int
    deleted: bool

    @classmethod
    def gone(cls, lsn: int) -> SourceState:
        return cls(None, (), lsn, True)


def lsn_text(lsn: int) -> str:
    return format_lsn(lsn)


def lsn_int(text: str | None) -> int:
    return 0 if text is None else parse_lsn(str(text))


COPY_MIN_ROWS = 64  # source rows saved through a staged COPY from this many on
_SAVE_SOURCE_ROWS = ("INSERT INTO {s}.source_rows (relation, row_key, row_values, docs, lsn, deleted) "
                     "VALUES ")
_SOURCE_ROWS_UPSERT = (" ON CONFLICT (relation, row_key) DO UPDATE SET row_values = excluded.row_values, "
                       "docs = excluded.docs, lsn = excluded.lsn, deleted = excluded.deleted")
_ADD_DEAD_LETTERS = ("INSERT INTO {s}.dead_letters (source_lsn, relation, row_key, op, row_values, error) "
                     "VALUES ")
_MARK_RELATION_DELETED = ("UPDATE {s}.source_rows SET deleted = true, row_values = NULL, docs = '[]', "
                          "lsn = %s WHERE relation = %s AND NOT deleted")


def _source_row(relation: str, key: str, st: SourceState) -> tuple:
    return (relation, key, Jsonb(st.values) if st.values is not None else None,
            Jsonb([d.to_json() for d in st.docs]), lsn_text(st.lsn), st.deleted)


def _dead_letter(d: DeadLetter) -> tuple:
    return (lsn_text(d.source_lsn) if d.source_lsn else None, d.relation, d.row_key, d.op,
            Jsonb(d.row_values) if d.row_values is not None else None, d.error)


class WorkerState:
    """Reads and writes the worker's tables in `schema` (on the search database)."""

    def __init__(self, schema: str = "slipstream") -> None:
        self.schema = check_identifier(schema, "schema")
        self._s = sql.Identifier(self.schema)
        self.changelog = ChangeLog(self.schema)
        self._queries: dict[str, bytes] = {}

    def q(self, text: str) -> bytes:
        """`text` with {s} as this schema, composed once per text and kept as query bytes
        (the apply transaction runs the same few statements for every batch)."""
        query = self._queries.get(text)
        if query is None:
            query = self._queries[text] = sql.SQL(text).format(s=self._s).as_bytes(None)
        return query

    def migrate(self, conn: psycopg.Connection) -> None:
        """Create or upgrade the worker tables. Idempotent; serialised by an advisory lock."""
        with conn.transaction():
            apply_migrations(conn, self.schema, "worker_migrations", _MIGRATIONS)
        self.changelog.migrate(conn)

    def claim_writer(self, conn: psycopg.Connection, slot: str, wait_seconds: float = 30.0) -> None:
        """Hold the apply-writer lock for `slot` for this session, or fail clearly.

        Waits up to `wait_seconds`: a worker that was just killed holds it until the
        server notices its connection is gone.
        """
        deadline = time.monotonic() + wait_seconds
        while True:
            (ok,) = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))",
                                 (f"slipstream-writer:{self.schema}:{slot}",)).fetchone()
            if ok or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if not ok:
            raise ConfigurationError(
                f"another slipstream worker is applying slot {slot!r} into schema {self.schema!r}; "
                "run one worker per slot (stop the other, or give this one its own slot and schema)")
        owner = self.changelog.writer(conn)
        if owner is not None and owner != slot and self._never_wrote(conn, owner):
            # A setup under another slot name that stopped before writing anything (the
            # name was refused, say): its claim guards nothing, and the user renamed it.
            self.changelog.release(conn, owner)
        self.changelog.claim(conn, slot)

    def _never_wrote(self, conn: psycopg.Connection, slot: str) -> bool:
        """No worker of `slot` runs, it has no checkpoint, and the change log is empty."""
        key = f"slipstream-writer:{self.schema}:{slot}"
        (free,) = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()
        if not free:
            return False
        conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
        (wrote,) = conn.execute(self.q(
            "SELECT EXISTS (SELECT FROM {s}.checkpoints WHERE slot = %s) "
            "OR EXISTS (SELECT FROM {s}.changes)"), (slot,)).fetchone()
        return not wrote

    def checkpoint(self, conn: psycopg.Connection, slot: str) -> Checkpoint:
        row = conn.execute(self.q(
            "SELECT lsn::text, partial_lsn::text, partial_offset, last_seq FROM {s}.checkpoints "
            "WHERE slot = %s"), (slot,)).fetchone()
        if row is None:
            return Checkpoint(0, None, 0, self.max_seq(conn))
        return Checkpoint(lsn_int(row[0]), lsn_int(row[1]) if row[1] else None, row[2], row[3])

    def max_seq(self, conn: psycopg.Connection) -> int:
        return self.changelog.max_seq(conn)

    def save_checkpoint(self, conn: psycopg.Connection, slot: str, cp: Checkpoint) -> None:
        conn.execute(*self.checkpoint_statement(slot, cp))

    def checkpoint_statement(self, slot: str, cp: Checkpoint) -> tuple[bytes, tuple]:
        """`save_checkpoint` as (query, params)."""
        return (self.q(
            "INSERT INTO {s}.checkpoints (slot, lsn, partial_lsn, partial_offset, last_seq) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (slot) DO UPDATE SET lsn = excluded.lsn, "
            "partial_lsn = excluded.partial_lsn, partial_offset = excluded.partial_offset, "
            "last_seq = excluded.last_seq, updated_at = now()"),
            (slot, lsn_text(cp.lsn), lsn_text(cp.partial_lsn) if cp.partial_lsn else None,
             cp.partial_offset, cp.last_seq))

    def load_source_rows(self, conn: psycopg.Connection, relation_keys: Iterable[tuple[str, str]]
                         ) -> dict[tuple[str, str], SourceState]:
        """(relation, row_key) -> its `SourceState`, for the keys that exist."""
        keys = list(dict.fromkeys(relation_keys))
        if not keys:
            return {}
        return self.source_rows_parse(conn.execute(*self.source_rows_query(keys)).fetchall())

    def source_rows_query(self, keys: Sequence[tuple[str, str]]) -> tuple[bytes, list[Any]]:
        """`load_source_rows`'s statement and parameters, for a caller that sends it along
        with other reads in one round trip.

        A few keys go as a list of rows, which the server plans in a third of the time
        of a join on arrays and the client binds without array dumpers (the steady
        stream's single-row batches); more keys go as two arrays, one statement for any
        count."""
        head = "SELECT relation, row_key, row_values, docs, lsn::text, deleted FROM {s}.source_rows "
        if 0 < len(keys) <= FEW_KEYS:
            return self.q(head + "WHERE (relation, row_key) IN (" + ", ".join(["(%s, %s)"] * len(keys)) + ")"), [
                v for k in keys for v in k]
        return self.q(head + "WHERE (relation, row_key) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"), [
            [k[0] for k in keys], [k[1] for k in keys]]

    @staticmethod
    def source_rows_parse(rows: Sequence[tuple]) -> dict[tuple[str, str], SourceState]:
        """The rows of `source_rows_query`, by (relation, row_key)."""
        return {(r[0], r[1]): SourceState(r[2], tuple(map(DocRef.from_json, r[3])), lsn_int(r[4]), r[5])
                for r in rows}

    def source_rows_of(self, conn: psycopg.Connection, relation: str
                       ) -> list[tuple[str, tuple[DocRef, ...]]]:
        """Every live source row of a relation: (row_key, docs)."""
        return [(r[0], tuple(map(DocRef.from_json, r[1]))) for r in conn.execute(self.q(
            "SELECT row_key, docs FROM {s}.source_rows WHERE relation = %s AND NOT deleted"),
            (relation,))]

    def save_source_rows(self, conn: psycopg.Connection,
                         rows: Sequence[tuple[str, str, SourceState]]) -> None:
        """Upsert (relation, row_key, state) rows."""
        if not rows:
            return
        if len(rows) < COPY_MIN_ROWS:
            with conn.cursor() as cur:
                cur.executemany(self.q(_SAVE_SOURCE_ROWS + "(%s, %s, %s, %s, %s, %s)" + _SOURCE_ROWS_UPSERT),
                                [_source_row(rel, key, st) for rel, key, st in rows])
            return
        # Many rows: binary COPY into a session staging table, then one upsert (an insert per
        # row costs several times more in the driver).
        stage = sql.Identifier(f"slipstream_source_stage_{self.schema}").as_bytes(None)
        conn.execute(b"CREATE TEMP TABLE IF NOT EXISTS " + stage + b" (relation text, row_key text, "
                     b"row_values jsonb, docs jsonb, lsn text, deleted boolean) ON COMMIT DELETE ROWS")
        with conn.cursor().copy(b"COPY " + stage + b" FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "jsonb", "jsonb", "text", "bool"])
            for rel, key, st in rows:
                copy.write_row(_source_row(rel, key, st))
        conn.execute(self.q(
            "INSERT INTO {s}.source_rows (relation, row_key, row_values, docs, lsn, deleted) "
            "SELECT relation, row_key, row_values, docs, lsn::pg_lsn, deleted FROM ")
            + stage + self.q(_SOURCE_ROWS_UPSERT))
        conn.execute(b"TRUNCATE " + stage)

    def lettered_relations(self, conn: psycopg.Connection) -> set[str]:
        """The relations with open dead letters."""
        return {r for (r,) in conn.execute(self.q(
            "SELECT DISTINCT relation FROM {s}.dead_letters WHERE resolved_at IS NULL"))}

    def settle_statement(self, rows: Sequence[tuple[str, str]], relations: Sequence[str] = ()
                         ) -> tuple[bytes, list[Any]] | None:
        """Resolve the open letters of `rows` ((relation, row_key): a later change of the
        row applied, or failed and is the row's letter now) and of every row of
        `relations` (truncated); None when there are none."""
        where, params = [], []
        if rows:
            where.append("(relation, row_key) IN (" + ", ".join(["(%s, %s)"] * len(rows)) + ")")
            params += [v for row in rows for v in row]
        if relations:
            where.append("relation = ANY(%s)")
            params.append(list(relations))
        if not where:
            return None
        return (self.q("UPDATE {s}.dead_letters SET resolved_at = now() WHERE resolved_at IS NULL "
                       "AND (" + " OR ".join(where) + ")"), params)

    def add_dead_letters(self, conn: psycopg.Connection, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        with conn.cursor() as cur:
            cur.executemany(self.q(_ADD_DEAD_LETTERS + "(%s, %s, %s, %s, %s, %s)"),
                            [_dead_letter(d) for d in letters])

    def write_statements(self, relations_truncated: Sequence[tuple[str, int]],
                         rows: Sequence[tuple[str, str, SourceState]],
                         letters: Sequence[DeadLetter], settled: Sequence[tuple[str, str]] = (),
                         settled_relations: Sequence[str] = ()) -> list[tuple[bytes, list[Any]]]:
        """`mark_relation_deleted` for each truncated relation, `settle_statement`, then
        `save_source_rows` and `add_dead_letters`, as (query, params) for a caller that
        sends its whole transaction as one query (multi-row inserts)."""
        out: list[tuple[bytes, list[Any]]] = [
            (self.q(_MARK_RELATION_DELETED), [lsn_text(lsn), relation])
            for relation, lsn in relations_truncated]
        settle = self.settle_statement(settled, settled_relations)
        if settle is not None:
            out.append(settle)
        if rows:
            out.append((self.q(_SAVE_SOURCE_ROWS + ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(rows))
                               + _SOURCE_ROWS_UPSERT),
                        [v for rel, key, st in rows for v in _source_row(rel, key, st)]))
        if letters:
            out.append((self.q(_ADD_DEAD_LETTERS + ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(letters))),
                        [v for d in letters for v in _dead_letter(d)]))
        return out

    def last_dead_letter_id(self, conn: psycopg.Connection) -> int:
        (last,) = conn.execute(self.q("SELECT coalesce(max(id), 0) FROM {s}.dead_letters")).fetchone()
        return int(last)

    def open_dead_letters(self, conn: psycopg.Connection, after_id: int = 0
                          ) -> dict[str, tuple[int, str]]:
        """Open dead letters with an id above `after_id`, per relation: (count, first error)."""
        rows = conn.execute(self.q(
            "SELECT relation, count(*), (array_agg(error ORDER BY id))[1] FROM {s}.dead_letters "
            "WHERE resolved_at IS NULL AND id > %s GROUP BY relation ORDER BY relation"),
            (after_id,)).fetchall()
        return {relation: (int(n), error) for relation, n, error in rows}

    def mark_relation_deleted(self, conn: psycopg.Connection, relation: str, lsn: int) -> None:
        """After a TRUNCATE: every source row of `relation` is gone as of `lsn`."""
        conn.execute(self.q(_MARK_RELATION_DELETED), (lsn_text(lsn), relation))

    # -- operator views and dead-letter retries -------------------------------------------

    def status(self, conn: psycopg.Connection, slot: str) -> dict[str, Any]:
        """The checkpoint row, open dead letters per table and copy progress, for `status`."""
        cp = conn.execute(self.q(
            "SELECT lsn::text, last_seq, updated_at FROM {s}.checkpoints WHERE slot = %s"),
            (slot,)).fetchone()
        dead = {t: n for t, (n, _) in self.open_dead_letters(conn).items()}
        snap = conn.execute(self.q(
            "SELECT relation, rows_copied, done FROM {s}.snapshot_progress ORDER BY 1")).fetchall()
        return {
            "checkpoint": None if cp is None else {
                "lsn": cp[0], "last_seq": cp[1], "updated_at": cp[2].isoformat()},
            "dead_letters": dead,
            "snapshot": [tuple(r) for r in snap],
        }

    def dead_letter_rows(self, conn: psycopg.Connection, *, limit: int | None = None,
                         ids: Sequence[int] | None = None) -> list[tuple]:
        """Open letters, oldest first: (id, created_at, relation, op, row_key, error);
        only those in `ids` when given."""
        return conn.execute(self.q(
            "SELECT id, created_at, relation, op, row_key, error FROM {s}.dead_letters "
            "WHERE resolved_at IS NULL AND (%s::bigint[] IS NULL OR id = ANY(%s)) "
            "ORDER BY id LIMIT %s"), (ids, ids, limit)).fetchall()

    def settle_retried_letter(self, conn: psycopg.Connection, letter_id: int, after_id: int) -> None:
        """After a retry's apply (in its transaction): letters added since `after_id` are the
        row failing again; fold them into `letter_id`, which stays open with the new error,
        or resolve `letter_id` when there are none."""
        again = conn.execute(self.q(
            "DELETE FROM {s}.dead_letters WHERE id > %s RETURNING error"), (after_id,)).fetchall()
        conn.execute(self.q(
            "UPDATE {s}.dead_letters SET retried_at = now(), error = coalesce(%s, error), "
            "resolved_at = CASE WHEN %s THEN now() END WHERE id = %s"),
            (again[-1][0] if again else None, not again, letter_id))
