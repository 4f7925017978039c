"""`slipstream setup`: make the source and search databases ready, idempotently.

Checks `wal_level`, resolves every configured table's key, creates the search schema
and the worker's tables, creates or extends the publication (only the configured
tables — never the search schema, so the worker does not consume its own writes),
and creates the slot. A new slot exports a snapshot and the tables are copied inside
it; tables whose copy has not finished (a crash, or a table added to the config
later) are copied again from where they stopped, and a table dropped and created again
under its name since its copy is copied afresh (`reset_replaced`).
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
from .pgtypes import source_conninfo
from .replication import ReplicationConnection
from .snapshot import (
    TableShape,
    copy_table,
    pending_tables,
    publishes_stored_generated,
    split_relation,
    table_shape,
)


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
    # Rows of the copy that went to dead letters, per table: (count, first error).
    dead_letters: dict[str, tuple[int, str]] = field(default_factory=dict)


def check_wal_level(conn: psycopg.Connection) -> None:
    (level,) = conn.execute("SHOW wal_level").fetchone()
    if level != "logical":
        raise WalLevelError(
            f"wal_level is {level!r} on the source database; set wal_level = logical "
            "(ALTER SYSTEM SET wal_level = logical) and restart Postgres")


def shapes(conn: psycopg.Connection, tables: Sequence[str], search_schema: str | None) -> list[TableShape]:
    out = []
    for relation in tables:
        schema, _ = split_relation(relation)
        if search_schema is not None and schema == search_schema:
            raise ConfigurationError(
                f"table {relation!r} is in the search schema {search_schema!r}; the worker must not "
                "index its own tables — remove it from [tables]")
        out.append(table_shape(conn, relation))
    return out


def ensure_publication(conn: psycopg.Connection, name: str, table_shapes: Sequence[TableShape],
                       report: SetupReport) -> None:
    """Create the publication, or add the configured tables it lacks.

    It publishes partitioned tables through their root (`publish_via_partition_root`):
    a change in any partition then arrives as a change of the configured table, with
    its columns. Without it, changes arrive under each partition's own name, which no
    mapper is registered for, and would be skipped. An existing publication without
    the option gets it when a configured table is partitioned. On PostgreSQL 18 it also
    publishes STORED generated columns (`publish_generated_columns`), which the copy
    reads too (`table_shape`), so a copied row and a streamed one have the same columns.
    """
    check_partitions(conn, table_shapes)
    tables = [shape.relation for shape in table_shapes]
    oids = [shape.oid for shape in table_shapes]
    idents = [sql.Identifier(*split_relation(t)) for t in tables]
    generated = publishes_stored_generated(conn)
    options = ["publish_via_partition_root = true"] + (["publish_generated_columns = stored"] if generated else [])
    row = conn.execute("SELECT puballtables, pubviaroot, " + ("pubgencols::text = 's'" if generated else "true")
                       + " FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
    if row is None:
        _publication_ddl(conn, sql.SQL("CREATE PUBLICATION {p} FOR TABLE {t} WITH ({o})").format(
            p=sql.Identifier(name), t=sql.SQL(", ").join(idents), o=sql.SQL(", ".join(options))))
        report.created_publication = True
        return
    check_publication(conn, name, table_shapes)
    all_tables, via_root, stored = row
    if not via_root and _any(conn, oids, "relkind = 'p'"):
        _publication_ddl(conn, sql.SQL("ALTER PUBLICATION {p} SET (publish_via_partition_root = true)").format(
            p=sql.Identifier(name)))
        report.via_partition_root = True
    if not stored and _any(conn, oids, "EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid "
                                       "AND a.attgenerated = 's' AND NOT a.attisdropped)"):
        _publication_ddl(conn, sql.SQL("ALTER PUBLICATION {p} SET (publish_generated_columns = stored)").format(
            p=sql.Identifier(name)))
        report.generated_columns = True
    if all_tables:
        return  # FOR ALL TABLES: every table is in it already
    # Members as published (a partitioned table shows as its partitions until the option
    # is on) and as added: a partitioned table is in pg_publication_rel itself.
    present = {f"{s}.{t}" for s, t in conn.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s "
        "UNION SELECT n.nspname, c.relname FROM pg_publication_rel r "
        "JOIN pg_publication p ON p.oid = r.prpubid JOIN pg_class c ON c.oid = r.prrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = %s", (name, name))}
    for relation, ident in zip(tables, idents):
        schema, table = split_relation(relation)
        if f"{schema}.{table}" not in present:
            _publication_ddl(conn, sql.SQL("ALTER PUBLICATION {p} ADD TABLE {t}").format(
                p=sql.Identifier(name), t=ident))
            report.added_tables.append(relation)


def _publication_ddl(conn: psycopg.Connection, statement: sql.Composed) -> None:
    """Run one publication statement; a role that may not gets the statement to have run.

    Postgres lets only a table's owner add it to a publication (and only the
    publication's owner alter it), which a role made for replication often is not.
    """
    try:
        conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege as exc:
        text = statement.as_string(conn)
        raise ConfigurationError(
            f"role {conn.info.user!r} may not run `{text}` (server said: "
            f"{exc.diag.message_primary or exc}); only the owner of the tables (and of the "
            f"publication) or a superuser may. Have one run `{text};` once, then run "
            "setup again: it uses the publication as it finds it") from None


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


_OPERATIONS = ("insert", "update", "delete", "truncate")


def check_publication(conn: psycopg.Connection, name: str, table_shapes: Sequence[TableShape]) -> None:
    """Refuse an existing publication that would hide changes of a configured table.

    A publication made by hand may leave out operations (`publish = 'insert, update'`),
    and, from PostgreSQL 15, publish only some columns of a table or only the rows a
    `WHERE` clause keeps. The worker would then miss deletes without a word, or copy
    rows and columns the stream never updates. Nothing is changed for it: other
    subscribers may rely on the publication as it is.
    """
    flags = conn.execute("SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication "
                         "WHERE pubname = %s", (name,)).fetchone()
    missing = [op for op, on in zip(_OPERATIONS, flags) if not on]
    if missing:
        raise ConfigurationError(
            f"publication {name!r} does not publish {', '.join(missing)}, so the index would "
            f"miss them; run ALTER PUBLICATION {name} SET (publish = 'insert, update, delete, "
            "truncate'), or set [source] publication to a name of the worker's own")
    if conn.info.server_version < 150000:
        return  # column lists and row filters came in 15
    by_oid = {shape.oid: shape.relation for shape in table_shapes}
    for oid, columns, rows in conn.execute(
            "SELECT r.prrelid::int, r.prattrs IS NOT NULL, r.prqual IS NOT NULL FROM pg_publication_rel r "
            "JOIN pg_publication p ON p.oid = r.prpubid WHERE p.pubname = %s AND r.prrelid = ANY(%s::oid[])",
            (name, list(by_oid))):
        if columns or rows:
            what = "only some of its columns (a column list)" if columns else "only some of its rows (a WHERE clause)"
            raise ConfigurationError(
                f"publication {name!r} publishes {what} of {by_oid[oid]}, so the copy and the "
                f"stream would disagree; publish the whole table (ALTER PUBLICATION {name} SET "
                f"TABLE …), or set [source] publication to a name of the worker's own"
                + ("; [tables] filter chooses which rows are indexed" if rows else ""))


def _any(conn: psycopg.Connection, oids: Sequence[int], condition: str) -> bool:
    """Whether the pg_class row `c` of any of `oids` meets `condition` (fixed SQL)."""
    row = conn.execute(f"SELECT EXISTS (SELECT FROM pg_class c WHERE c.oid = ANY(%s::oid[]) AND {condition})",
                       (list(oids),)).fetchone()
    return bool(row[0])


def check_partitions(conn: psycopg.Connection, table_shapes: Sequence[TableShape]) -> None:
    """Refuse a configured partition whose partitioned table is configured too: its
    changes are published as the partitioned table's, so it would be indexed twice at
    the copy and never again after."""
    by_oid = {shape.oid: shape.relation for shape in table_shapes}
    for shape in table_shapes:
        for (ancestor,) in conn.execute(
                "SELECT relid::int FROM pg_partition_ancestors(%s::oid) WHERE relid <> %s::oid",
                (shape.oid, shape.oid)):
            if ancestor in by_oid:
                raise ConfigurationError(
                    f"table {shape.relation!r} is a partition of {by_oid[ancestor]!r}, which is "
                    f"configured too; changes of a partition are published as its partitioned "
                    f'table\'s, so remove [tables."{shape.relation}"] (the partitioned table covers its rows)')


_ZONED = (1184, 1266)  # timestamptz, timetz: their text depends on the session's TimeZone


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
            (lsn,) = source.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            batch = Batch(snapshot=True)
            batch.changes.append(SourceChange(kind="truncate", relation=shape.relation,
                                              commit_lsn=parse_lsn(lsn), truncated=(shape.relation,)))
            applier.apply(batch, also=lambda c, r=shape.relation: c.execute(
                state.q("DELETE FROM {s}.snapshot_progress WHERE relation = %s"), (r,)))
            replaced.append(shape.relation)
        elif relid is None or key is None:
            conn.execute(state.q("UPDATE {s}.snapshot_progress SET relid = %s, key_columns = %s "
                                 "WHERE relation = %s"), (shape.oid, list(shape.key), shape.relation))
            conn.commit()
    return replaced


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
          progress: Callable[[str, int], None] | None = None,
          copy_pending: bool = True, notice: Callable[[str], None] | None = None) -> SetupReport:
    """Prepare everything `run` needs; safe to run again at any time.

    A new slot's tables are always copied here, inside its exported snapshot. With an
    existing slot, tables whose copy has not finished are copied here too, unless
    `copy_pending` is False — then `run` copies them between stream batches instead.
    `notice` is told, while a new slot waits for transactions open on the server to
    end, which sessions they are (`BlockerReport`).
    """
    report = SetupReport()
    source_dsn = source_conninfo(source_dsn)  # the copy reads values as the stream sends them
    with psycopg.connect(source_dsn, autocommit=True) as source:
        check_wal_level(source)
        table_shapes = shapes(source, tables, search_schema)
        check_row_security(source, table_shapes)
        ensure_publication(source, publication, table_shapes, report)
        report.replaced = reset_replaced(applier, source, table_shapes)
        todo = set(pending_tables(applier, tables))
        if not slot_exists(source, slot):
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
                                applier, snap, shape, chunk_rows=chunk_rows,
                                snapshot_lsn=created.consistent_point, progress=progress)
                    snap.rollback()
            return report
        for shape in table_shapes:
            if shape.relation in todo and copy_pending:
                report.copied[shape.relation] = copy_table(
                    applier, source, shape, chunk_rows=chunk_rows, progress=progress)
            elif shape.relation in todo:
                report.deferred.append(shape.relation)
    return report
