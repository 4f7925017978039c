"""The publication the worker streams through: what it must hold, and making it so.

`ensure_publication` creates it for the configured tables, or adds the ones an
existing publication lacks, and switches on what the tables need
(`publish_via_partition_root`, `publish_generated_columns`). It refuses, before
changing anything, a publication made by hand that would hide changes
(`check_publication`) and a partition configured beside its partitioned table
(`check_partitions`), and tells a role that may not run a statement which one to
have an owner run (`_publication_ddl`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql
from slipstream.index.errors import ConfigurationError

from .snapshot import TableShape, publishes_stored_generated, split_relation

if TYPE_CHECKING:
    from .setup import SetupReport

__all__ = ["check_partitions", "check_publication", "ensure_publication", "published"]


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
    present = published(conn, name)
    for relation, ident in zip(tables, idents):
        schema, table = split_relation(relation)
        if f"{schema}.{table}" not in present:
            _publication_ddl(conn, sql.SQL("ALTER PUBLICATION {p} ADD TABLE {t}").format(
                p=sql.Identifier(name), t=ident))
            report.added_tables.append(relation)


def published(conn: psycopg.Connection, name: str) -> set[str] | None:
    """The tables ("schema.table") publication `name` holds; None when it holds every
    table (FOR ALL TABLES), an empty set when there is no such publication. Members as
    published (a partitioned table shows as its partitions until the option is on) and
    as added: a partitioned table is in pg_publication_rel itself."""
    row = conn.execute("SELECT puballtables FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
    if row is not None and row[0]:
        return None
    return {f"{s}.{t}" for s, t in conn.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s "
        "UNION SELECT n.nspname, c.relname FROM pg_publication_rel r "
        "JOIN pg_publication p ON p.oid = r.prpubid JOIN pg_class c ON c.oid = r.prrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = %s", (name, name))}


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


def release_table(conn: psycopg.Connection, name: str, relation: str) -> bool:
    """Drop `relation` ("schema.table") from publication `name` if it is in it; True if it was."""
    schema, table = split_relation(relation)
    if conn.execute("SELECT FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s "
                    "AND tablename = %s", (name, schema, table)).fetchone() is None:
        return False
    _publication_ddl(conn, sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
        sql.Identifier(name), sql.Identifier(schema, table)))
    return True


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
