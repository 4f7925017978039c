"""`slipstream setup`: make the source and search databases ready, idempotently.

Checks `wal_level`, resolves every configured table's key, refuses row-level
security that would hide rows from the copy, creates the search schema and the
worker's tables, creates or extends the publication (`publication`: only the
configured tables — never the search schema, so the worker does not consume its own
writes), and creates the slot (naming the open transactions it waits for). A new slot exports a snapshot and the tables are copied inside
it; tables whose copy has not finished (a crash, or a table added to the config
later) are copied again from where they stopped, and a table dropped and created again
under its name, or keyed by other columns, since its copy is copied afresh
(`reset_replaced`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from slipstream.index.errors import ConfigurationError

from .apply import Applier
from .blockers import BlockerReport
from .errors import WalLevelError
from .incoming import Batch, SourceChange
from .lsn import parse_lsn
from .pgtypes import OID, source_conninfo
from .publication import ensure_publication, release_table
from .replication import ReplicationConnection
from .snapshot import TableShape, copy_table, pending_tables, split_relation, table_shape
from .typealias import type_aliases


@dataclass
class SetupReport:
    created_publication: bool = False
    added_tables: list[str] = field(default_factory=list)
    created_slot: bool = False
    copied: dict[str, int] = field(default_factory=dict)
    deferred: list[str] = field(default_factory=list)  # to be copied while streaming
    via_partition_root: bool = False  # an existing publication was set to publish via roots
    generated_columns: bool = False  # ... and to publish STORED generated columns
    replaced: list[str] = field(default_factory=list)  # tables dropped and created again: re-copied
    remapped: list[str] = field(default_factory=list)  # mapped otherwise since their copy: re-copied
    # Tables copied before but no longer configured: their documents stay until forgotten.
    unconfigured: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)  # ... tombstoned, and out of the publication
    # Copied before under a slot that is gone: copied again in the new slot's snapshot,
    # and their rows deleted while no slot recorded changes tombstoned (`mark_resync`).
    resynced: list[str] = field(default_factory=list)
    # Rows of the copy that went to dead letters, per table: (count, first error).
    dead_letters: dict[str, tuple[int, str]] = field(default_factory=dict)


def check_wal_level(conn: psycopg.Connection) -> None:
    (level,) = conn.execute("SHOW wal_level").fetchone()
    if level != "logical":
        raise WalLevelError(
            f"wal_level is {level!r} on the source database; set wal_level = logical "
            "(ALTER SYSTEM SET wal_level = logical) and restart Postgres")


def shapes(conn: psycopg.Connection, tables: Sequence[str], search_schema: str | None) -> list[TableShape]:
    aliases = type_aliases(conn)
    out = []
    for relation in tables:
        schema, _ = split_relation(relation)
        if search_schema is not None and schema == search_schema:
            raise ConfigurationError(
                f"table {relation!r} is in the search schema {search_schema!r}; the worker must not "
                "index its own tables — remove it from [tables]")
        out.append(table_shape(conn, relation, aliases))
    return out


def check_row_security(conn: psycopg.Connection, table_shapes: Sequence[TableShape]) -> None:
    """Refuse a table whose row-level security applies to this role.

    The copy reads rows through the role's policies, while the stream carries every
    row whatever the policies: the index would miss the rows the policies hide until
    each one changes. The connections also pin `row_security = off`, so a read the
    policies would filter fails instead of returning fewer rows (as pg_dump does).
    """
    by_oid = {shape.oid: shape.relation for shape in table_shapes}
    for (oid,) in conn.execute(
            "SELECT c.oid::int FROM pg_class c WHERE c.oid = ANY(%s::oid[]) AND c.relrowsecurity "
            "AND NOT (SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user) "
            "AND (c.relforcerowsecurity OR NOT pg_has_role(current_user, c.relowner, 'USAGE')) "
            "ORDER BY 1", (list(by_oid),)).fetchall():
        user = sql.Identifier(conn.info.user).as_string(conn)
        raise ConfigurationError(
            f"table {by_oid[oid]} has row-level security that applies to role {conn.info.user!r}: "
            "the copy would read only the rows its policies show, while the stream carries "
            f"every row. As a superuser run ALTER ROLE {user} BYPASSRLS; (the role then reads "
            "every row, as logical replication does)")


_ZONED = (OID["timestamptz"], OID["timetz"])  # their text depends on the session's TimeZone


def reset_replaced(applier: Applier, source: psycopg.Connection, table_shapes: Sequence[TableShape]
                   ) -> list[str]:
    """Tables copied before that must be copied afresh, because the stream cannot carry
    what changed since:

    * the OID changed: the table was dropped and created again under the same name (or
      swapped in by renames); the stream then skips changes of the old OID (the
      `TxnAssembler` knows each table's current one);
    * the key changed (another primary key or replica identity index): every row's
      key, and so its documents' ids, are another.

    Their documents are tombstoned, as a TRUNCATE would, and their copy is forgotten,
    in one transaction, so they are copied afresh. A table copied before OIDs or keys
    were recorded adopts its current ones; except a REPLICA IDENTITY FULL table with a
    primary key, which was keyed by all of its columns then, and a table keyed by a
    `timestamptz` or `timetz` column, whose values were read in the server's time zone
    then (in UTC since). Returns the reset tables."""
    conn, state = applier.conn, applier.state
    recorded = {r[0]: r[1:] for r in conn.execute(state.q(
        "SELECT relation, relid::int, key_columns FROM {s}.snapshot_progress")).fetchall()}
    conn.commit()
    replaced = []
    for shape in table_shapes:
        if shape.relation not in recorded:
            continue
        relid, key = recorded[shape.relation]
        if key is None and shape.identity == "f":
            key = [c[0] for c in shape.columns]  # how such a table was keyed before
        elif key is None and any(t in _ZONED for n, t, _ in shape.columns if n in shape.key):
            key = []  # its keys were read in the server's time zone then, in UTC now
        if (relid is not None and relid != shape.oid) or (key is not None and tuple(key) != shape.key):
            _tombstone_table(applier, source, shape.relation)
            replaced.append(shape.relation)
        elif relid is None or key is None:
            conn.execute(state.q("UPDATE {s}.snapshot_progress SET relid = %s, key_columns = %s "
                                 "WHERE relation = %s"), (shape.oid, list(shape.key), shape.relation))
            conn.commit()
    return replaced


def _tombstone_table(applier: Applier, source: psycopg.Connection, relation: str) -> None:
    """Tombstone every document of `relation`, as a TRUNCATE would, and forget its copy,
    in one transaction."""
    (lsn,) = source.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    batch = Batch(snapshot=True)
    batch.changes.append(SourceChange(kind="truncate", relation=relation, commit_lsn=parse_lsn(lsn),
                                      truncated=(relation,)))
    applier.apply(batch, also=lambda c: c.execute(applier.state.q(
        "DELETE FROM {s}.snapshot_progress WHERE relation = %s"), (relation,)))


def forget_tables(applier: Applier, source: psycopg.Connection, publication: str,
                  tables: Sequence[str], forget: Sequence[str]) -> tuple[list[str], list[str]]:
    """(tables copied before that the configuration no longer lists, those of them
    forgotten). Forgetting one (`forget`) takes it out of the publication and tombstones
    its documents, as a TRUNCATE would, so devices delete them too; the others' documents
    stay searchable, as a table left out of the configuration by mistake should."""
    conn, state = applier.conn, applier.state
    recorded = [r for (r,) in conn.execute(state.q(
        "SELECT relation FROM {s}.snapshot_progress ORDER BY 1")).fetchall()]
    conn.commit()
    unconfigured = [r for r in recorded if r not in tables]
    for relation in forget:
        if relation not in unconfigured:
            raise ConfigurationError(
                f"--forget {relation!r}: " + ("it is still configured; remove its [tables] section "
                                              "first" if relation in tables else
                                              "no table of that name was ever copied here")
                + (f" (copied and no longer configured: {', '.join(unconfigured)})"
                   if unconfigured else ""))
    for relation in forget:
        release_table(source, publication, relation)  # first: a role that may not changes nothing
        _tombstone_table(applier, source, relation)
    return [r for r in unconfigured if r not in forget], list(forget)


def reset_remapped(applier: Applier, tables: Sequence[str], recopy: Sequence[str] = ()) -> list[str]:
    """Tables whose rows the configuration now maps otherwise than at their copy (another
    template, filter, chunking, object type or mapper: `Registry.fingerprint`), and the
    tables in `recopy`: their copy is started again from the first row. Nothing is
    tombstoned first: each row's copy replaces its documents, tombstoning those the new
    mapping no longer makes, and writes (and logs) only documents that changed. A copy
    recorded before mappings were is adopted as it is. Returns the tables reset."""
    conn, state = applier.conn, applier.state
    recorded = dict(conn.execute(state.q(
        "SELECT relation, mapping FROM {s}.snapshot_progress")).fetchall())
    reset = []
    for table in tables:
        if table not in recorded:
            continue  # never copied: its first copy records its mapping
        mapping = applier.mapping_of(table)
        if table in recopy or (recorded[table] is not None and recorded[table] != mapping):
            conn.execute(state.q(
                "UPDATE {s}.snapshot_progress SET done = false, last_key = NULL, rows_copied = 0, "
                "read_lsn = NULL, mapping = %s, updated_at = now() WHERE relation = %s"), (mapping, table))
            reset.append(table)
        elif recorded[table] is None:
            conn.execute(state.q("UPDATE {s}.snapshot_progress SET mapping = %s WHERE relation = %s"),
                         (mapping, table))
    conn.commit()
    return reset


def mark_resync(applier: Applier, source: psycopg.Connection, tables: Sequence[str]) -> list[str]:
    """Tables copied before whose changes went unrecorded for a while are to be copied
    again: before a new slot is made for a search schema that already holds copies
    (the old slot dropped by hand, by `teardown --keep-index`, or invalidated), and
    for a table found out of the publication (taken out by hand, or the publication
    dropped) and put back. The WAL position now is stored with the reset: the copy
    stamps each row it reads at a later one (the new slot's consistent point, or where
    each chunk is read), so a row stored before it and not read again was deleted
    meanwhile, and the copy's last step tombstones it (`snapshot._vanished`). Stored in
    the same statement as the reset, so a setup that stops before its copy finishes
    still finishes both. Returns the tables reset."""
    conn, state = applier.conn, applier.state
    recorded = {r for (r,) in conn.execute(state.q("SELECT relation FROM {s}.snapshot_progress"))}
    conn.commit()
    todo = [t for t in tables if t in recorded]
    if not todo:
        return []
    (lsn,) = source.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    conn.execute(state.q(
        "UPDATE {s}.snapshot_progress SET done = false, last_key = NULL, rows_copied = 0, "
        "resync_lsn = %s::pg_lsn, updated_at = now() WHERE relation = ANY(%s)"), (lsn, todo))
    conn.commit()
    return todo


def slot_exists(conn: psycopg.Connection, slot: str) -> bool:
    """Whether this database has the slot; a slot of that name elsewhere is a ConfigurationError."""
    row = conn.execute("SELECT database, plugin FROM pg_replication_slots WHERE slot_name = %s",
                       (slot,)).fetchone()
    if row is None:
        return False
    database, plugin = row
    if database != conn.info.dbname or plugin != "pgoutput":
        raise ConfigurationError(
            f"replication slot {slot!r} already exists for database {database!r} "
            f"(plugin {plugin!r}); slot names are cluster-wide: set [source] slot to another name")
    return True


def setup(source_dsn: str, *, slot: str, publication: str, tables: Sequence[str],
          applier: Applier, search_schema: str | None, chunk_rows: int = 5000,
          chunk_bytes: int | None = None, progress: Callable[[str, int], None] | None = None,
          copy_pending: bool = True, notice: Callable[[str], None] | None = None,
          recopy: Sequence[str] = (), forget: Sequence[str] = ()) -> SetupReport:
    """Prepare everything `run` needs; safe to run again at any time.

    A new slot's tables are always copied here, inside its exported snapshot. With an
    existing slot, tables whose copy has not finished are copied here too, unless
    `copy_pending` is False — then `run` copies them between stream batches instead.
    `notice` is told, while a new slot waits for transactions open on the server to
    end, which sessions they are (`BlockerReport`). Tables in `recopy`, and tables the
    configuration now maps otherwise, are copied again (`reset_remapped`); tables no
    longer configured are reported, and those in `forget` forgotten (`forget_tables`).
    """
    report = SetupReport()
    source_dsn = source_conninfo(source_dsn)  # the copy reads values as the stream sends them
    with psycopg.connect(source_dsn, autocommit=True) as source:
        check_wal_level(source)
        have_slot = slot_exists(source, slot)  # a name taken elsewhere: refused before any change
        table_shapes = shapes(source, tables, search_schema)
        check_row_security(source, table_shapes)
        ensure_publication(source, publication, table_shapes, report)
        report.replaced = reset_replaced(applier, source, table_shapes)
        report.remapped = reset_remapped(applier, tables, recopy)
        report.unconfigured, report.forgotten = forget_tables(applier, source, publication,
                                                              tables, forget)
        if not have_slot:
            report.resynced = mark_resync(applier, source, tables)
        else:  # a table that was out of the publication: its changes meanwhile were not sent
            report.resynced = mark_resync(applier, source, list(tables) if report.created_publication
                                          else report.added_tables)
        todo = set(pending_tables(applier, tables))
        if not have_slot:
            with ReplicationConnection.connect(source_dsn) as repl:
                with BlockerReport(source_dsn, repl.backend_pid, notice or (lambda line: None)):
                    created = repl.create_slot(slot, export_snapshot=True)
                report.created_slot = True
                with psycopg.connect(source_dsn) as snap:
                    snap.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    snap.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                        sql.Literal(created.snapshot_name)))
                    if snap.info.server_version >= 170000:  # the whole copy is one transaction
                        snap.execute("SET transaction_timeout = 0")
                    for shape in table_shapes:
                        if shape.relation in todo:
                            report.copied[shape.relation] = copy_table(
                                applier, snap, shape, chunk_rows=chunk_rows, chunk_bytes=chunk_bytes,
                                snapshot_lsn=created.consistent_point, progress=progress)
                    snap.rollback()
            return report
        for shape in table_shapes:
            if shape.relation in todo and copy_pending:
                report.copied[shape.relation] = copy_table(
                    applier, source, shape, chunk_rows=chunk_rows, chunk_bytes=chunk_bytes,
                    progress=progress)
            elif shape.relation in todo:
                report.deferred.append(shape.relation)
    return report
