"""Copying existing rows: the initial snapshot and later backfills, chunked and resumable.

A table is read in primary-key order, `chunk_rows` at a time, with `COPY ... TO STDOUT`,
so every column arrives in its type's output text (what pgoutput sends), and each chunk is applied as a
batch of `snapshot` changes. The chunk's position is saved in `snapshot_progress` in
the same transaction, so a restarted copy resumes after the last chunk applied.

Consistency with the stream: the first copy runs inside the snapshot exported when
the slot was created, so it sees exactly the rows committed before the slot's
consistent point, and the stream then delivers everything after it. A resumed copy
(the exported snapshot died with the process) or a backfill of a table added later
reads current rows instead, each chunk stamped with the WAL position at which it was
read; the applier skips a copied row whenever the stream has already applied that
row at or after that position, so a copy never overwrites a newer change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from slipstream.index.errors import ConfigurationError

from .apply import Applier
from .incoming import Batch, SourceChange, row_key
from .lsn import format_lsn, parse_lsn
from .pgoutput import NotUtf8, text_value
from .typealias import type_aliases


@dataclass(frozen=True, slots=True)
class TableShape:
    """What the copy needs of a source table."""

    relation: str  # schema.table
    # (name, type OID to decode as (`typealias`), SQL type), the columns the stream carries
    columns: tuple[tuple[str, int, str], ...]
    key: tuple[str, ...]
    unpublished: tuple[str, ...] = ()  # generated columns the stream does not carry
    oid: int = 0  # the table's pg_class OID: a table created again under its name has another
    identity: str = "d"  # pg_class.relreplident: d(efault), i(ndex), f(ull)
    # The column sets a constraint or index keeps unique (primary key, unique indexes
    # without a predicate or expression): `id_columns` must hold one of them.
    unique: tuple[tuple[str, ...], ...] = ()

    @property
    def type_oids(self) -> tuple[tuple[str, int], ...]:
        return tuple((n, oid) for n, oid, _ in self.columns)


def split_relation(relation: str) -> tuple[str, str]:
    schema, _, table = relation.partition(".")
    if not table:
        return "public", schema
    return schema, table


def table_shape(conn: psycopg.Connection, relation: str,
                aliases: Mapping[int, int] | None = None) -> TableShape:
    """Columns and replica-identity key of `relation`, or a ConfigurationError saying what to fix.

    The columns are those pgoutput sends, so that a copied row has exactly the columns
    of a streamed one: generated columns are left out unless the server publishes them
    (PostgreSQL 18 publishes STORED ones when the publication asks, as `setup` makes
    it; none are published before 18, and VIRTUAL ones never). Each column's type is
    the one to decode it as: `aliases` (`typealias.type_aliases`, read here when None).
    """
    schema, table = split_relation(relation)
    row = conn.execute(
        "SELECT c.oid, c.relreplident, c.relkind::text, c.relpersistence::text FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s "
        "AND c.relkind IN ('r', 'p', 'v', 'm', 'f')", (schema, table)).fetchone()
    if row is None or row[2] not in ("r", "p") or row[3] != "p":
        raise ConfigurationError(_not_a_table(conn, relation, row and (row[2], row[3])))
    oid, ident = row[:2]
    published = ("",) + (("s",) if publishes_stored_generated(conn) else ())
    if aliases is None:
        aliases = type_aliases(conn)
    columns, unpublished = [], []
    for name, type_oid, sql_type, generated in conn.execute(
            "SELECT attname, atttypid::int, format_type(atttypid, atttypmod), attgenerated::text "
            "FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (oid,)):
        if generated in published:
            columns.append((name, aliases.get(type_oid, type_oid), sql_type))
        else:
            unpublished.append(name)
    # A row's identity: the replica identity index's columns, else the primary key's. With
    # REPLICA IDENTITY FULL the stream sends every old column, so the primary key still
    # names the row (set FULL to get old values, as Supabase Realtime asks); only a FULL
    # table with no primary key is identified by all of its columns.
    key = tuple(r[0] for r in conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
        "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = %s AND (CASE WHEN %s = 'i' THEN i.indisreplident ELSE i.indisprimary END) "
        "ORDER BY a.attnum", (oid, ident)).fetchall())
    if ident == "f" and not key:
        key = tuple(c[0] for c in columns)
    if not key or ident == "n":
        raise ConfigurationError(
            f"table {relation!r} has no primary key or replica identity, so updates and deletes "
            f"cannot be followed; add a primary key, or run ALTER TABLE {relation} REPLICA IDENTITY "
            "USING INDEX <unique index> (or REPLICA IDENTITY FULL)")
    unique = tuple(tuple(r[0]) for r in conn.execute(
        "SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_index i JOIN pg_attribute a "
        "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s "
        "AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL GROUP BY i.indexrelid "
        "ORDER BY 1", (oid,)).fetchall())
    return TableShape(relation, tuple(columns), key, tuple(unpublished), int(oid), ident, unique)


_NOT_TABLES = {"v": "a view", "m": "a materialized view", "f": "a foreign table"}


def _not_a_table(conn: psycopg.Connection, relation: str, kind: tuple[str, str] | None) -> str:
    """Why `relation` cannot be followed, and what to do about it."""
    if kind is not None and kind[0] in _NOT_TABLES:
        return (f"{relation!r} is {_NOT_TABLES[kind[0]]}; logical replication carries only "
                "tables' changes: configure the tables it reads from instead")
    if kind is not None:
        return (f"table {relation!r} is {'UNLOGGED' if kind[1] == 'u' else 'TEMPORARY'}: its "
                "changes are not written to the WAL, so logical replication cannot carry them; "
                f"make it an ordinary table (ALTER TABLE {relation} SET LOGGED)")
    schema, table = split_relation(relation)
    near = conn.execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE lower(n.nspname) = lower(%s) AND lower(c.relname) = lower(%s) AND c.relkind IN ('r', 'p') "
        "ORDER BY 1 LIMIT 1", (schema, table)).fetchone()
    hint = f"; did you mean {near[0]!r}? (names are case-sensitive)" if near else ""
    return (f"table {relation!r} does not exist in the source database; fix the [tables] key "
            f"or create the table{hint}")


def publishes_stored_generated(conn: psycopg.Connection) -> bool:
    """Whether the server can publish STORED generated columns (PostgreSQL 18 and later)."""
    return conn.info.server_version >= 180000


def _select(shape: TableShape, where: sql.Composable | None, tail: sql.Composable) -> sql.Composed:
    """`COPY (SELECT every column ...) TO STDOUT`: each value in its type's output text.

    COPY's text format writes every value with the type's output function, which is
    what pgoutput sends, so a copied row decodes exactly like a streamed one. A cast
    to text would not do: `boolean::text` is 'true' where the output function says
    't', `inet::text` adds '/32', `char(n)::text` drops the padding.
    """
    schema, table = split_relation(shape.relation)
    return sql.SQL("COPY (SELECT {cols} FROM {t}{where}{tail}) TO STDOUT").format(
        cols=sql.SQL(", ").join(sql.Identifier(n) for n, _, _ in shape.columns),
        t=sql.Identifier(schema, table),
        where=sql.SQL(" WHERE ") + where if where is not None else sql.SQL(""), tail=tail)


def _key_match(shape: TableShape, op: str, values: Sequence[str | None]) -> sql.Composed:
    """`(k1, k2) <op> ('v1'::type1, 'v2'::type2)`: key values given in their output text
    (a `NotUtf8` value as its own bytes)."""
    types = {n: t for n, _, t in shape.columns}

    def literal(v: str | None) -> sql.Composable:
        if isinstance(v, NotUtf8):
            return sql.SQL("convert_from({}::bytea, 'SQL_ASCII')").format(sql.Literal(v.raw))
        return sql.Literal(v)

    return sql.SQL("({key}) {op} ({vals})").format(
        key=sql.SQL(", ").join(sql.Identifier(k) for k in shape.key), op=sql.SQL(op),
        vals=sql.SQL(", ").join(sql.SQL("{}::{}").format(literal(v), sql.SQL(types[k]))
                                for k, v in zip(shape.key, values)))


def _copy_rows(conn: psycopg.Connection, shape: TableShape, stmt: sql.Composed
               ) -> list[dict[str, str | None]]:
    names = [n for n, _, _ in shape.columns]
    if conn.info.parameter_status("server_encoding") == "SQL_ASCII":
        return _copy_raw_rows(conn, names, stmt)
    with conn.cursor().copy(stmt) as copy:
        return [dict(zip(names, row)) for row in copy.rows()]


def _copy_raw_rows(conn: psycopg.Connection, names: list[str], stmt: sql.Composed
                   ) -> list[dict[str, str | None]]:
    """The rows of a SQL_ASCII database, whose bytes converting to UTF8 would check (the
    first value that is not UTF-8 would fail the whole copy): read as they are, each
    value a `NotUtf8` when it is not UTF-8, as the stream reads them."""
    conn.execute("SET client_encoding = 'SQL_ASCII'")  # psycopg then reads text as bytes
    try:
        with conn.cursor().copy(stmt) as copy:
            return [{n: None if v is None else text_value(v) for n, v in zip(names, row)}
                    for row in copy.rows()]
    finally:
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.INERROR:
            conn.execute("SET client_encoding = 'UTF8'")


_RAW_LENGTH = frozenset((17, 19, 25, 1042, 1043))  # bytea, name, text, bpchar, varchar


def _row_bytes(shape: TableShape) -> sql.Composed:
    """A row's size in bytes, read without detoasting: a string's own length (a TOASTed
    value's length is in its pointer), other values' stored size."""
    return sql.SQL(" + ").join(
        sql.SQL("coalesce({}({}), 0)").format(
            sql.SQL("octet_length" if oid in _RAW_LENGTH else "pg_column_size"), sql.Identifier(name))
        for name, oid, _ in shape.columns)


def _chunk_end(conn: psycopg.Connection, shape: TableShape, where: sql.Composable | None,
               chunk_rows: int, chunk_bytes: int | None) -> list[str | None] | None:
    """The key of a chunk's last row: at most `chunk_rows` rows after `where`, and no more
    than `chunk_bytes` of them (at least one row); None when none is left."""
    schema, table = split_relation(shape.relation)
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in shape.key)
    desc = sql.SQL(", ").join(sql.SQL("{} DESC").format(sql.Identifier(k)) for k in shape.key)
    inner = sql.SQL("SELECT {keys}, {size} AS sz FROM {t}{where} ORDER BY {keys} LIMIT {n}").format(
        keys=keys, size=_row_bytes(shape) if chunk_bytes else sql.SQL("0"),
        t=sql.Identifier(schema, table), n=sql.Literal(chunk_rows),
        where=sql.SQL(" WHERE ") + where if where is not None else sql.SQL(""))
    stmt = sql.SQL(
        "COPY (SELECT {keys} FROM (SELECT {keys}, sz, sum(sz) OVER (ORDER BY {keys}) AS running "
        "FROM ({inner}) r) s WHERE running <= {budget} OR running = sz ORDER BY {desc} LIMIT 1"
        ") TO STDOUT"
    ).format(keys=keys, inner=inner, desc=desc, budget=sql.Literal(chunk_bytes or 1))
    columns = {c[0]: c for c in shape.columns}
    rows = _copy_rows(conn, replace(shape, columns=tuple(columns[k] for k in shape.key)), stmt)
    return [rows[0][k] for k in shape.key] if rows else None


def read_chunks(conn: psycopg.Connection, shape: TableShape, after: Sequence[str] | None,
                chunk_rows: int, chunk_bytes: int | None = None) -> Iterator[list[dict[str, str | None]]]:
    """Rows as {column: text}, in key order after the key `after`, `chunk_rows` at a time
    and, with `chunk_bytes`, no more than that many bytes of them (a chunk is at least one
    row): a table of long texts is copied in as many rows as fit, not `chunk_rows` of
    them at once."""
    schema, table = split_relation(shape.relation)
    order = sql.SQL(" ORDER BY {keys}").format(
        keys=sql.SQL(", ").join(sql.Identifier(schema, table, k) for k in shape.key))
    last = list(after) if after is not None else None
    while True:
        where = _key_match(shape, ">", last) if last is not None else None
        end = _chunk_end(conn, shape, where, chunk_rows, chunk_bytes)
        if end is None:
            return
        upto = _key_match(shape, "<=", end)
        chunk = _copy_rows(conn, shape, _select(
            shape, upto if where is None else sql.SQL("{} AND {}").format(where, upto), order))
        if not chunk:
            return
        yield chunk
        last = [chunk[-1][k] for k in shape.key]


def read_row(conn: psycopg.Connection, shape: TableShape, key: Sequence[str | None]
             ) -> dict[str, str | None] | None:
    """One row as {column: text} by its key values (as text), or None if it is gone."""
    rows = _copy_rows(conn, shape, _select(shape, _key_match(shape, "=", key), sql.SQL("")))
    return rows[0] if rows else None


def copy_steps(applier: Applier, source: psycopg.Connection, shape: TableShape, *,
               chunk_rows: int = 5000, chunk_bytes: int | None = None, snapshot_lsn: int | None = None,
               progress: Callable[[str, int], None] | None = None) -> Iterator[int]:
    """Copy one table through `applier`, one chunk per step, resuming from its saved position.

    Yields the rows copied so far after each chunk's transaction commits. `source`
    must be inside the exported snapshot when `snapshot_lsn` (the slot's consistent
    point) is given; otherwise each chunk is stamped with the WAL position read just
    before it, which is what guards newer streamed changes. Each chunk is planned only
    after the one before has committed, so stream batches may run between steps.
    """
    for batch, also, copied in _chunks(applier, source, shape, chunk_rows, chunk_bytes, snapshot_lsn):
        applier.apply(batch, also=also)
        if progress is not None and batch.changes:
            progress(shape.relation, copied)
        yield copied


def copy_table(applier: Applier, source: psycopg.Connection, shape: TableShape, *,
               chunk_rows: int = 5000, chunk_bytes: int | None = None, snapshot_lsn: int | None = None,
               progress: Callable[[str, int], None] | None = None) -> int:
    """Copy a whole table at once (as `copy_steps`); returns the rows copied in all.

    Each chunk is read and planned (mapping, analysis, embedding: Python's work) while
    the one before commits on a thread of its own (the search database's work), in
    order, as the stream's pipeline does. Only for a copy that nothing else writes
    beside, as in `setup`: a chunk planned before a stream batch commits could write
    an older row over it, so a backfill beside the stream goes by `copy_steps`.
    """
    copied = 0
    with ThreadPoolExecutor(1, thread_name_prefix="slipstream-copy-commit") as committer:
        pending: tuple[Future, Batch, int] | None = None
        for batch, also, total in _chunks(applier, source, shape, chunk_rows, chunk_bytes,
                                          snapshot_lsn):
            planned = applier.plan(batch)
            if pending is not None:
                _committed(pending, shape, progress)
            pending = committer.submit(applier.commit, planned, also), batch, total
            copied = total
        if pending is not None:
            _committed(pending, shape, progress)
    return copied


def _committed(pending: tuple[Future, Batch, int], shape: TableShape,
               progress: Callable[[str, int], None] | None) -> None:
    future, batch, copied = pending
    future.result()  # a failed commit raises here
    if progress is not None and batch.changes:
        progress(shape.relation, copied)


def _chunks(applier: Applier, source: psycopg.Connection, shape: TableShape, chunk_rows: int,
            chunk_bytes: int | None, snapshot_lsn: int | None) -> Iterator[tuple[Batch, Callable[[psycopg.Connection], None], int]]:
    """Each chunk's batch of `snapshot` changes with the progress row its transaction
    writes, and the rows copied once it commits; last, an empty batch marking the copy
    done."""
    state, conn = applier.state, applier.conn
    row = conn.execute(state.q("SELECT last_key, rows_copied, done, resync_lsn::text "
                               "FROM {s}.snapshot_progress WHERE relation = %s"),
                       (shape.relation,)).fetchone()
    conn.commit()
    if row is not None and row[2]:
        return
    after = row[0] if row is not None else None
    copied = int(row[1]) if row is not None else 0
    chunks = read_chunks(source, shape, after, chunk_rows, chunk_bytes)
    while True:
        read_lsn = snapshot_lsn
        if read_lsn is None:
            (text,) = source.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            read_lsn = parse_lsn(text)
        chunk = next(chunks, None)
        if chunk is None:
            break
        batch = Batch(snapshot=True)
        for values in chunk:
            batch.changes.append(SourceChange(
                kind="snapshot", relation=shape.relation, commit_lsn=read_lsn,
                key=row_key(values, shape.key), values=dict(values), columns=shape.type_oids))
        copied += len(chunk)
        last_key = [chunk[-1][k] for k in shape.key]
        yield batch, _save_progress(applier, shape, last_key, copied, read_lsn, False), copied
    if row is not None and row[3] is not None:
        for batch in _vanished(applier, shape.relation, parse_lsn(row[3]), chunk_rows):
            yield batch, lambda c: None, copied
    yield (Batch(snapshot=True), _save_progress(applier, shape, None, copied, snapshot_lsn or 0, True), copied)


def _vanished(applier: Applier, relation: str, resync_lsn: int, page: int) -> Iterator[Batch]:
    """Batches deleting the rows of `relation` stored before `resync_lsn` that neither the
    copy (which stamps every row it reads at or after it) nor the stream has touched
    since: rows deleted while no slot recorded it. Keyset pages, so a page planned
    before the one before it commits is never read twice; read on the planning
    connection, as the one that commits may be committing the page before meanwhile."""
    state, conn = applier.state, applier.read_conn
    after = ""
    while True:
        keys = [k for (k,) in conn.execute(state.q(
            "SELECT row_key FROM {s}.source_rows WHERE relation = %s AND NOT deleted "
            "AND lsn < %s::pg_lsn AND row_key > %s ORDER BY row_key LIMIT %s"),
            (relation, format_lsn(resync_lsn), after, page))]
        conn.commit()
        if not keys:
            return
        batch = Batch(snapshot=True)
        batch.changes.extend(SourceChange(kind="vanished", relation=relation, commit_lsn=resync_lsn,
                                          key=k) for k in keys)
        yield batch
        after = keys[-1]


def _save_progress(applier: Applier, shape: TableShape, last_key, copied: int, lsn: int, done: bool):
    def save(conn: psycopg.Connection) -> None:
        conn.execute(applier.state.q(
            "INSERT INTO {s}.snapshot_progress (relation, last_key, rows_copied, read_lsn, done, relid, "
            "key_columns, mapping) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (relation) "
            "DO UPDATE SET last_key = coalesce(excluded.last_key, {s}.snapshot_progress.last_key), "
            "rows_copied = excluded.rows_copied, read_lsn = excluded.read_lsn, done = excluded.done, "
            "resync_lsn = CASE WHEN excluded.done THEN NULL ELSE {s}.snapshot_progress.resync_lsn END, "
            "relid = excluded.relid, key_columns = excluded.key_columns, mapping = excluded.mapping, "
            "updated_at = now()"),
            (shape.relation, Jsonb(last_key) if last_key is not None else None, copied,
             format_lsn(lsn), done, shape.oid, list(shape.key), applier.mapping_of(shape.relation)))
    return save


def pending_tables(applier: Applier, relations: Sequence[str]) -> list[str]:
    """The configured tables whose copy has not finished."""
    done = {r for (r,) in applier.conn.execute(applier.state.q(
        "SELECT relation FROM {s}.snapshot_progress WHERE done"))}
    applier.conn.commit()
    return [r for r in relations if r not in done]
