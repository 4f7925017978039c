"""The approximate (HNSW) side of the Postgres search table, kept off the write path.

An HNSW insert costs the server milliseconds of its own time per row (a graph search
and the repair of its neighbours' links), far more than the rest of a row's write. So
the search table keeps no HNSW index on ``docs``. Each space has a side table
``ann_<space>(id, partition, v)`` that carries the HNSW index, and ``ann_queue`` lists
the ``docs`` rows whose side-table entry may be out of date:

* statement triggers on ``docs`` append the id of every row inserted, updated or
  deleted to ``ann_queue``, in the writer's own transaction, whoever the writer is;
* `index_queued` (the worker's indexer, through `ann_step`) takes the oldest queued
  ids and brings their side-table entries up to date from ``docs`` (upsert the
  current vector and partition, or delete), and deletes those queue entries, in one
  statement and one transaction, one such transaction at a time per schema (an
  advisory lock); a backlog of a tenth of the table or more (an initial copy) is
  cheaper to rebuild in one go (`rebuild_ann`);
* a search above the exact limit ranks the HNSW candidates of the side table, joined
  to ``docs`` for the current vector, partition and filters, together with every
  queued row in scope, scored exactly.

Whatever a snapshot sees, a live row with a vector has its current vector in the side
table or an entry in the queue (both change in one transaction), so a row is
searchable from the commit that wrote it; the side table only decides how fast. A
stale side-table entry can only add a candidate, which the join to ``docs`` rescores
by the current vector or drops. The worker drains the queue on a thread of its own
(`AnnIndexer`); without it, `PostgresBackend` drains after each write it commits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

ANN_BATCH = 200  # queued rows per `index_queued` statement: about half a second of HNSW inserts
REBUILD_MIN = 5_000  # queued rows from which `ann_step` may rebuild instead of draining ...
REBUILD_SHARE = 0.1  # ... if they are also this share of the side table's rows

ANN_QUEUE_DDL = """
CREATE TABLE {s}.ann_queue (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id bigint NOT NULL);
CREATE FUNCTION {s}.ann_enqueue_new() RETURNS trigger LANGUAGE plpgsql AS
    $$BEGIN INSERT INTO {s}.ann_queue (id) SELECT id FROM new_rows; RETURN NULL; END$$;
CREATE FUNCTION {s}.ann_enqueue_old() RETURNS trigger LANGUAGE plpgsql AS
    $$BEGIN INSERT INTO {s}.ann_queue (id) SELECT id FROM old_rows; RETURN NULL; END$$
"""

# A side-table row takes the current partition and vector; an unchanged one is not
# written again (an HNSW insert is the expensive part).
_UPSERT = sql.SQL(
    "ON CONFLICT (id) DO UPDATE SET partition = excluded.partition, v = excluded.v "
    "WHERE a.partition IS DISTINCT FROM excluded.partition OR a.v IS DISTINCT FROM excluded.v")

_TRIGGERS = (
    ("docs_ann_insert", "INSERT", "NEW TABLE AS new_rows", "ann_enqueue_new"),
    ("docs_ann_update", "UPDATE", "NEW TABLE AS new_rows", "ann_enqueue_new"),
    ("docs_ann_delete", "DELETE", "OLD TABLE AS old_rows", "ann_enqueue_old"),
)


def ann_table(space: str) -> str:
    return f"ann_{space}"


class AnnIndex:
    """Mixed into `PostgresBackend` (which provides `_q`, `_s`, `schema`, `spaces`,
    `connection` and `_writing`)."""

    _s: Any
    schema: str
    spaces: dict[str, int]
    ann_spaces: frozenset[str] = frozenset()  # spaces whose side table exists
    _ann_backlog = False  # the last drain was full: `ann_step` looks at the queue's length
    _drain_sql: bytes | None = None

    # -- schema ---------------------------------------------------------------------------

    def _ensure_ann(self, conn: psycopg.Connection, space: str, dim: int) -> None:
        """Create `space`'s side table and its HNSW index, and the queue's triggers, where
        missing (nothing is locked when all exist). A table from before the side tables (an HNSW index on ``docs``) is moved
        over: the side table is filled from ``docs``, indexed, and the old index dropped."""
        if not self._exists(conn, ann_table(space)):
            self._build_side(conn, ann_table(space), sql.Identifier(f"emb_{space}"), dim)
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {s}.{i}").format(
                s=self._s, i=sql.Identifier(f"docs_emb_{space}_hnsw")))
        # Once per schema: CREATE TRIGGER locks out writers of docs, so not at every start.
        (have,) = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = ANY(%s)",
            (f'"{self.schema}".docs', [t[0] for t in _TRIGGERS])).fetchone()
        if have == len(_TRIGGERS):
            return
        for name, event, ref, fn in _TRIGGERS:
            conn.execute(sql.SQL(
                "CREATE OR REPLACE TRIGGER {n} AFTER {e} ON {s}.docs REFERENCING {r} "
                "FOR EACH STATEMENT EXECUTE FUNCTION {s}.{f}()").format(
                    n=sql.Identifier(name), e=sql.SQL(event), s=self._s, r=sql.SQL(ref),
                    f=sql.Identifier(fn)))

    def _read_ann_spaces(self, conn: psycopg.Connection) -> None:
        have = {r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'r' AND c.relname LIKE 'ann\\_%%'",
            (self.schema,))}
        self.ann_spaces = frozenset(s for s in self.spaces if ann_table(s) in have)
        self._drain_sql = None

    # -- re-embedding ---------------------------------------------------------------------

    def _next_table(self, space: str) -> sql.Identifier:
        return sql.Identifier(f"{ann_table(space)}__next")

    def index_shadow_ann(self, space: str) -> None:
        """Before a re-embed's switch: build ``ann_<space>__next`` from the shadow column
        and index it, in one transaction (so it exists whole or not at all). Writers go
        on meanwhile; `switch_ann` catches up with what they changed."""
        table = self._next_table(space)
        with self.connection() as c, c.transaction():
            if self._exists(c, f"{ann_table(space)}__next_hnsw"):
                return
            c.execute(sql.SQL("DROP TABLE IF EXISTS {s}.{t}").format(s=self._s, t=table))
            self._build_next(c, space, sql.Identifier(f"emb_{space}__next"))

    def _build_next(self, c: psycopg.Connection, space: str, column: sql.Identifier) -> None:
        self._build_side(c, f"{ann_table(space)}__next", column, self.spaces[space])

    def _build_side(self, c: psycopg.Connection, name: str, column: sql.Identifier, dim: int) -> None:
        """Side table `name` from the live rows' `column`, then its HNSW index (built in
        one go, much cheaper per row than inserting into a live index)."""
        table = sql.Identifier(name)
        c.execute(sql.SQL(
            "CREATE TABLE {s}.{t} (id bigint PRIMARY KEY, partition text NOT NULL, v vector({d}) NOT NULL)"
        ).format(s=self._s, t=table, d=sql.Literal(dim)))
        c.execute(sql.SQL("INSERT INTO {s}.{t} (id, partition, v) SELECT id, partition, {c} "
                          "FROM {s}.docs WHERE NOT deleted AND {c} IS NOT NULL").format(
                              s=self._s, t=table, c=column))
        c.execute(sql.SQL("CREATE INDEX {i} ON {s}.{t} USING hnsw (v vector_cosine_ops)").format(
            i=sql.Identifier(f"{name}_hnsw"), s=self._s, t=table))

    def _exists(self, c: psycopg.Connection, relation: str) -> bool:
        return bool(c.execute("SELECT to_regclass(%s) IS NOT NULL",
                              (f'"{self.schema}"."{relation}"',)).fetchone()[0])

    def switch_ann(self, conn: psycopg.Connection, space: str) -> None:
        """In the switch's transaction, after the new vectors became ``emb_<space>`` and
        with writers locked out: bring ``ann_<space>__next`` up to date with them (built
        now if `index_shadow_ann` never ran) and swap it in for ``ann_<space>``."""
        table = self._next_table(space)
        column = sql.Identifier(f"emb_{space}")
        if not self._exists(conn, f"{ann_table(space)}__next_hnsw"):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {s}.{t}").format(s=self._s, t=table))
            self._build_next(conn, space, column)
        else:
            conn.execute(sql.SQL(
                "DELETE FROM {s}.{t} a WHERE NOT EXISTS (SELECT 1 FROM {s}.docs d WHERE d.id = a.id "
                "AND NOT d.deleted AND d.{c} IS NOT NULL)").format(s=self._s, t=table, c=column))
            conn.execute(sql.SQL(
                "INSERT INTO {s}.{t} AS a (id, partition, v) SELECT id, partition, {c} FROM {s}.docs "
                "WHERE NOT deleted AND {c} IS NOT NULL {upsert}").format(
                    s=self._s, t=table, c=column, upsert=_UPSERT))
        self._swap_next(conn, space)

    def _swap_next(self, conn: psycopg.Connection, space: str) -> None:
        table = self._next_table(space)
        current = sql.Identifier(ann_table(space))
        conn.execute(sql.SQL("DROP TABLE {s}.{t}").format(s=self._s, t=current))
        conn.execute(sql.SQL("ALTER TABLE {s}.{t} RENAME TO {u}").format(s=self._s, t=table, u=current))
        for suffix in ("_hnsw", "_pkey"):
            conn.execute(sql.SQL("ALTER INDEX {s}.{i} RENAME TO {j}").format(
                s=self._s, i=sql.Identifier(f"{ann_table(space)}__next{suffix}"),
                j=sql.Identifier(f"{ann_table(space)}{suffix}")))

    # -- the queue ------------------------------------------------------------------------

    def _drain_statement(self) -> bytes:
        """One statement: take the oldest `limit` queue entries and bring each space's side
        table up to date for their rows; returns how many entries it took."""
        if self._drain_sql is None:
            parts = []
            for i, space in enumerate(sorted(self.ann_spaces)):
                t, c = sql.Identifier(ann_table(space)), sql.Identifier(f"emb_{space}")
                parts.append(sql.SQL(
                    ", gone{i} AS (DELETE FROM {s}.{t} a USING ids LEFT JOIN {s}.docs d "
                    "ON d.id = ids.id AND NOT d.deleted WHERE a.id = ids.id AND d.{c} IS NULL)"
                    ", put{i} AS (INSERT INTO {s}.{t} AS a (id, partition, v) "
                    "SELECT d.id, d.partition, d.{c} FROM ids JOIN {s}.docs d ON d.id = ids.id "
                    "WHERE NOT d.deleted AND d.{c} IS NOT NULL "
                    "{upsert})").format(i=sql.SQL(str(i)), s=self._s, t=t, c=c, upsert=_UPSERT))
            self._drain_sql = sql.SQL(
                "WITH taken AS (DELETE FROM {s}.ann_queue WHERE seq IN (SELECT seq FROM {s}.ann_queue "
                "ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id), "
                "ids AS (SELECT DISTINCT id FROM taken){parts} SELECT count(*) FROM taken").format(
                    s=self._s, parts=sql.SQL("").join(parts)).as_bytes(None)
        return self._drain_sql

    @property
    def _ann_lock(self) -> str:
        """The advisory lock's key: one drain or rebuild at a time per schema."""
        return f"slipstream:ann:{self.schema}"

    def index_queued(self, limit: int = ANN_BATCH, conn: psycopg.Connection | None = None) -> int:
        """Bring the side tables up to date for the `limit` oldest queued rows, in one
        transaction (the caller's, given `conn`); returns how many queue entries it took."""
        if not self.ann_spaces:
            return 0
        with self.connection(conn) as c:
            if conn is None:
                with c.transaction():
                    return self._drain(c, limit)
            return self._drain(c, limit)

    def _drain(self, c: psycopg.Connection, limit: int) -> int:
        # One drain at a time per schema, each reading ``docs`` after the last one
        # committed: two at once could take two entries of one row and write its older
        # state last (an upsert applies to the newest version, whatever its snapshot).
        c.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._ann_lock,))
        # No wait for the WAL flush: a drain lost in a crash loses its queue deletions
        # with it, so the rows are taken again; the apply's own fsyncs keep the disk.
        c.execute("SET LOCAL synchronous_commit = off")
        return int(c.execute(self._drain_statement(), (limit,)).fetchone()[0])

    def ann_step(self, limit: int = ANN_BATCH) -> int:
        """The indexer's unit of work: `index_queued`, or, when the last drain was full and
        at least `REBUILD_MIN` rows and a tenth of the side table wait (an initial copy, a
        backfill, a mass update), `rebuild_ann`: building an HNSW index in one go costs
        about a fourteenth of inserting its rows one by one
        (`bench/bench_hnsw.py`). Returns the entries taken."""
        if not self.ann_spaces:
            return 0
        if self._ann_backlog:
            with self.connection() as c:
                rows = max(0.0, *(c.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass",
                                            (f'"{self.schema}"."{ann_table(sp)}"',)).fetchone()[0]
                                  for sp in self.ann_spaces))
                threshold = max(REBUILD_MIN, int(rows * REBUILD_SHARE))
                (waiting,) = c.execute(self._q(
                    "SELECT count(*) FROM (SELECT 1 FROM {s}.ann_queue LIMIT %s) AS w"),
                    (threshold,)).fetchone()
            if waiting >= threshold:
                self._ann_backlog = False
                return self.rebuild_ann()
        n = self.index_queued(limit)
        self._ann_backlog = n >= limit
        return n

    def rebuild_ann(self) -> int:
        """Build every side table afresh from ``docs`` and swap it in, taking every queue
        entry the build's snapshot sees; returns how many. Rows written meanwhile keep
        their entries for the next drain. Searches read the old side tables until the
        swap."""
        lock = self._ann_lock
        with self.connection() as c:  # pooled: autocommit between the statements below
            c.execute("SELECT pg_advisory_lock(hashtext(%s))", (lock,))  # before the snapshot
            try:
                with c.transaction():
                    c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    taken = c.execute(self._q("DELETE FROM {s}.ann_queue")).rowcount
                    for space in sorted(self.ann_spaces):
                        table = self._next_table(space)
                        c.execute(sql.SQL("DROP TABLE IF EXISTS {s}.{t}").format(s=self._s, t=table))
                        self._build_next(c, space, sql.Identifier(f"emb_{space}"))
                        self._swap_next(c, space)
            finally:
                c.execute("SELECT pg_advisory_unlock(hashtext(%s))", (lock,))
        return taken

    def drain_ann(self, limit: int = ANN_BATCH) -> int:
        """`index_queued` until a pass takes fewer than `limit` entries (the queue was
        empty at its snapshot); returns how many entries it took."""
        total = 0
        while True:
            n = self.index_queued(limit)
            total += n
            if n < limit:
                return total

    def ann_queue_rows(self, conn: psycopg.Connection | None = None) -> int:
        """Queue entries not yet indexed (rows searched exactly above the exact limit)."""
        if not self.ann_spaces:
            return 0
        with self.connection(conn) as c:
            return int(c.execute(self._q("SELECT count(*) FROM {s}.ann_queue")).fetchone()[0])

    # -- search ---------------------------------------------------------------------------

    def _ann_candidates(self, c: psycopg.Connection, space: str, q: Any, sparams: list,
                        fsql: sql.Composable, fparams: list, depth: int) -> list[tuple]:
        """The HNSW top `depth` of the side table within the scope, joined to ``docs``
        (current vector, partition, filters), then every queued row in scope; each key
        once. Fewer than `depth` rows means the HNSW part came back short. Call inside
        the search's transaction."""
        col = sql.Identifier("d", f"emb_{space}")
        scoped = bool(sparams)
        in_scope = sql.SQL("d.partition = ANY(%s) AND " if scoped else "")
        ann_scope = sql.SQL("a.partition = ANY(%s) AND " if scoped else "")
        rows = c.execute(sql.SQL(
            "SELECT d.object_type, d.object_id, d.node_kind, {col} FROM {s}.{t} a "
            "JOIN {s}.docs d ON d.id = a.id WHERE {ann_scope}{in_scope}NOT d.deleted AND {f} "
            "AND {col} IS NOT NULL ORDER BY a.v <=> %s::vector LIMIT %s").format(
                col=col, s=self._s, t=sql.Identifier(ann_table(space)), ann_scope=ann_scope,
                in_scope=in_scope, f=fsql),
            [*sparams, *sparams, *fparams, q, depth], binary=True).fetchall()
        if len(rows) < depth:  # short (filters, a small scope): the caller ranks exactly
            return rows
        tail = c.execute(sql.SQL(
            "SELECT d.object_type, d.object_id, d.node_kind, {col} FROM {s}.docs d "
            "WHERE d.id IN (SELECT id FROM {s}.ann_queue) AND {in_scope}NOT d.deleted AND {f} "
            "AND {col} IS NOT NULL").format(col=col, s=self._s, in_scope=in_scope, f=fsql),
            [*sparams, *fparams], binary=True).fetchall()
        seen = {(r[0], r[1], r[2]) for r in rows}
        rows.extend(r for r in tail if (r[0], r[1], r[2]) not in seen)
        return rows



class AnnIndexer:
    """The worker's thread that drains ``ann_queue``: woken after each apply commit
    (`poke`), and every `interval` seconds regardless; it waits `settle` seconds after a
    wake-up so that one drain takes the rows of several commits. A failed pass is
    logged and tried again on the next wake-up."""

    def __init__(self, index_queued: Callable[[int], int], *,
                 log: Callable[..., None] | None = None, interval: float = 5.0,
                 limit: int = ANN_BATCH, settle: float = 0.1) -> None:
        self._index_queued = index_queued
        self._log = log
        self._interval = interval
        self._limit = limit
        self._settle = settle  # after a wake-up, let more commits queue up: fewer, larger drains
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.indexed = 0  # queue entries taken, for tests and metrics
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="slipstream-ann", daemon=True)

    def start(self) -> AnnIndexer:
        self._thread.start()
        return self

    def poke(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            if self._stop.wait(self._settle):
                return
            self._wake.clear()
            try:
                while not self._stop.is_set():
                    n = self._index_queued(self._limit)
                    self.indexed += n
                    if n < self._limit:
                        break
            except Exception as exc:  # noqa: BLE001 - the next wake-up tries again
                self.failures += 1
                if self._log is not None:
                    self._log("ann_index_failed", error=f"{type(exc).__name__}: {exc}"[:300])
                self._stop.wait(1.0)
