"""`slipstream teardown`: remove what `setup` made, so nothing is left holding WAL back.

On the source: the replication slot (for as long as it exists, the server keeps every
WAL segment the slot has not confirmed, and a slot nobody reads fills the disk) and
the publication. On the search database: the search schema, with the index, the
change log and the worker's state — unless kept.

Every check comes before anything is dropped, so a refusal drops nothing: a worker
still streaming from the slot, a slot of that name that belongs to another database,
a search schema that holds objects slipstream did not make (a schema shared with the
application is never dropped whole). Running it again finds nothing left and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from .errors import SlotInUseError, TeardownRefusedError

# Tables the index, the change log and the worker make in the search schema; with HNSW,
# also one side table per space (`ann_<space>`, and `ann_<space>__next` while rebuilt).
OWN_TABLES = frozenset({
    "migrations", "spaces", "docs", "embed_cache", "ann_queue",
    "worker_migrations", "checkpoints", "source_rows", "dead_letters", "snapshot_progress",
    "changes", "changelog_migrations", "changelog_writer", "changelog_horizon"})
OWN_FUNCTIONS = frozenset({"ann_enqueue_new", "ann_enqueue_old"})
LOCK_TIMEOUT = "30s"  # dropping the schema waits this long for searches and `serve` reads


@dataclass
class TeardownPlan:
    """What exists and will be dropped (or kept), found before anything is."""

    slot: str
    publication: str
    schema: str
    slot_lag_bytes: int | None = None  # WAL the slot holds back; None: no slot
    publication_tables: int | None = None  # None: no publication
    schema_documents: int | None = None  # None: no schema (or kept)
    keep_publication: bool = False
    keep_index: bool = False
    dropped: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return (self.slot_lag_bytes is None
                and (self.publication_tables is None or self.keep_publication)
                and (self.schema_documents is None or self.keep_index))

    def describe(self) -> list[str]:
        """One line per object: what will happen to it."""
        lines = []
        if self.slot_lag_bytes is None:
            lines.append(f"replication slot {self.slot!r}: not found")
        else:
            lines.append(f"replication slot {self.slot!r}: drop (it holds back "
                         f"{self.slot_lag_bytes:,} bytes of WAL)")
        if self.publication_tables is None:
            lines.append(f"publication {self.publication!r}: not found")
        elif self.keep_publication:
            lines.append(f"publication {self.publication!r}: keep ({self.publication_tables} tables)")
        else:
            lines.append(f"publication {self.publication!r}: drop ({self.publication_tables} tables)")
        if self.keep_index:
            lines.append(f"search schema {self.schema!r}: keep")
        elif self.schema_documents is None:
            lines.append(f"search schema {self.schema!r}: not found")
        else:
            lines.append(f"search schema {self.schema!r}: drop ({self.schema_documents:,} documents, "
                         "the change log and the worker's state; devices will need a new download)")
        return lines


def plan_teardown(source_dsn: str, search_dsn: str, *, slot: str, publication: str, schema: str,
                  keep_publication: bool = False, keep_index: bool = False) -> TeardownPlan:
    """Find what there is to drop; raise (dropping nothing) if it must not be."""
    plan = TeardownPlan(slot, publication, schema, keep_publication=keep_publication,
                        keep_index=keep_index)
    with psycopg.connect(source_dsn, autocommit=True) as src:
        row = src.execute(
            "SELECT database, active_pid, database = current_database(), "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
        if row is not None:
            database, pid, ours, lag = row
            if not ours:
                raise TeardownRefusedError(
                    f"replication slot {slot!r} belongs to database {database!r}, not to the "
                    "source database the configuration names; nothing was dropped")
            _refuse_if_active(slot, pid)
            plan.slot_lag_bytes = int(lag or 0)
        row = src.execute(
            "SELECT (SELECT count(*) FROM pg_publication_tables t WHERE t.pubname = p.pubname) "
            "FROM pg_publication p WHERE p.pubname = %s", (publication,)).fetchone()
        plan.publication_tables = None if row is None else int(row[0])
    if not keep_index:
        with psycopg.connect(search_dsn, autocommit=True) as conn:
            if _schema_exists(conn, schema):
                _refuse_if_shared(conn, schema)
                docs = conn.execute(
                    "SELECT to_regclass(format('%%I.docs', %s::text)) IS NOT NULL", (schema,)).fetchone()[0]
                plan.schema_documents = conn.execute(sql.SQL("SELECT count(*) FROM {}.docs").format(
                    sql.Identifier(schema))).fetchone()[0] if docs else 0
    return plan


def run_teardown(plan: TeardownPlan, source_dsn: str, search_dsn: str, *,
                 lock_timeout: str = LOCK_TIMEOUT) -> TeardownPlan:
    """Drop what `plan` found: the slot first (what costs the source), then the
    publication, then the search schema in one transaction. `plan.dropped` names each."""
    with psycopg.connect(source_dsn, autocommit=True) as src:
        if plan.slot_lag_bytes is not None:
            try:
                src.execute("SELECT pg_drop_replication_slot(%s)", (plan.slot,))
            except psycopg.errors.ObjectInUse:
                row = src.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                                  (plan.slot,)).fetchone()
                _refuse_if_active(plan.slot, row[0] if row else None)
                raise
            except psycopg.errors.UndefinedObject:
                pass  # dropped meanwhile
            plan.dropped.append(f"replication slot {plan.slot!r}")
        if plan.publication_tables is not None and not plan.keep_publication:
            src.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(plan.publication)))
            plan.dropped.append(f"publication {plan.publication!r}")
    if plan.schema_documents is not None and not plan.keep_index:
        with psycopg.connect(search_dsn) as conn:
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout)))
            _refuse_if_shared(conn, plan.schema)  # again, inside the transaction that drops it
            try:
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(plan.schema)))
            except psycopg.errors.LockNotAvailable:
                raise TeardownRefusedError(
                    f"the search schema {plan.schema!r} is in use (a `slipstream serve`, a search, "
                    f"or a worker of another slot) and stayed locked for {lock_timeout}; stop what "
                    "uses it and run teardown again" + _so_far(plan)) from None
        plan.dropped.append(f"search schema {plan.schema!r}")
    return plan


def _refuse_if_active(slot: str, pid: int | None) -> None:
    if pid is not None:
        raise SlotInUseError(
            f"replication slot {slot!r} is in use by a running worker (walsender pid {pid}); "
            "stop the worker, then run teardown again. Nothing was dropped")


def _schema_exists(conn: psycopg.Connection, schema: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is not None


def _refuse_if_shared(conn: psycopg.Connection, schema: str) -> None:
    """Refuse a schema holding tables, views, sequences of their own, functions or types
    slipstream did not make."""
    spaces: set[str] = set()
    if conn.execute("SELECT to_regclass(format('%%I.spaces', %s::text))", (schema,)).fetchone()[0]:
        spaces = {r[0] for r in conn.execute(sql.SQL("SELECT name FROM {}.spaces").format(
            sql.Identifier(schema)))}
    own = OWN_TABLES | {f"ann_{s}" for s in spaces} | {f"ann_{s}__next" for s in spaces}
    foreign = [r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND (c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c') OR c.relkind = 'S' "
        "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass "
        "AND d.objid = c.oid AND d.deptype IN ('a', 'i'))) ORDER BY 1", (schema,))
        if r[0] not in own]
    foreign += [r[0] + "()" for r in conn.execute(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = %s ORDER BY 1", (schema,)) if r[0] not in OWN_FUNCTIONS]
    foreign += [r[0] for r in conn.execute(
        "SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
        "WHERE n.nspname = %s AND t.typrelid = 0 AND t.typcategory <> 'A' ORDER BY 1", (schema,))]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise TeardownRefusedError(
            f"the search schema {schema!r} also holds objects slipstream did not make ({shown}), "
            "so it is not dropped whole; nothing was dropped. Run teardown with --keep-index to "
            "drop only the slot and the publication, then drop slipstream's tables by hand")


def _so_far(plan: TeardownPlan) -> str:
    return f" (dropped so far: {', '.join(plan.dropped)})" if plan.dropped else ""
