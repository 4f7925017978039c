"""The change-log reader: a partition's changes since a cursor, as pages of current rows.

`changes_since` reads, in ONE statement (so one snapshot and one round trip), the log
entries of the requested partitions after `cursor` (in seq order, at most `limit`), the
docs rows of their keys, the compaction horizon and the log's end, and turns each
(key, partition) the page touches into one entry, placed at its last seq in the page:

* a `Tombstone(key, partition)` when the key's last entry in that partition (in the
  page) is ``d``, **or** its ``docs`` row is missing or deleted, **or** ``docs.partition``
  is another partition — so a row moved away disappears from the old partition even
  when the ``d`` entry of the move lies beyond this page;
* else a `ShardRow`: the row's current content from ``docs``, with the analysed term
  counts as the server stored them (a device never re-analyses) and the vectors of the
  requested spaces as little-endian float32 bytes.

Content is the row's state in the snapshot, which may be newer than the page's last
entry; later pages carry the same or newer content, so applying pages in order
converges on the server's state at the last cursor. `next_cursor` is the last seq of
the page when more follow, else the last seq visible in the snapshot (the single
apply writer commits seqs in order, so every seq up to it is visible).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.adapt import Loader
from psycopg.pq import Format
from slipstream.index.doc import DocKey, check_identifier
from slipstream.index.errors import UnknownSpaceError, ValidationError

from .changelog import ChangeLog, check_idle
from .entries import Entry, Page, ShardRow, Tombstone
from .errors import ResyncRequired

__all__ = ["Entry", "Page", "PageRead", "ShardRow", "Tombstone", "changes_since", "read_page",
           "read_page_async"]

MAX_LIMIT = 100_000


class VectorBytesLoader(Loader):
    """pgvector's binary form (``>HH`` dim, unused; then big-endian float32s) as
    little-endian float32 bytes, the shard's wire and storage form."""

    format = Format.BINARY

    def load(self, data) -> bytes:
        dim = int.from_bytes(bytes(data[:2]), "big")
        return np.frombuffer(data, ">f4", count=dim, offset=4).astype("<f4").tobytes()


def check_partitions(partitions: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(partitions, str):
        partitions = (partitions,)
    parts = tuple(dict.fromkeys(partitions))
    if not parts or not all(isinstance(p, str) and p and "\x00" not in p for p in parts):
        raise ValidationError("partitions must be a non-empty list of non-empty strings")
    return parts


def check_spaces(conn: psycopg.Connection, schema: str,
                 spaces: Sequence[str] | None) -> dict[str, int]:
    """{space: dim} for the requested spaces (None: all the server's), in the given order;
    unknown ones raise."""
    dims = dict(conn.execute(sql.SQL("SELECT name, dim FROM {s}.spaces ORDER BY name").format(
        s=sql.Identifier(schema))).fetchall())
    if spaces is None:
        return {s: int(d) for s, d in dims.items()}
    if isinstance(spaces, str):
        spaces = (spaces,)
    wanted = [check_identifier(s, "embedding space") for s in dict.fromkeys(spaces)]
    unknown = [s for s in wanted if s not in dims]
    if unknown:
        raise UnknownSpaceError(
            f"space(s) {unknown} are not in {schema}.docs; the server has {sorted(dims) or 'none'}")
    return {s: int(dims[s]) for s in wanted}


def vector_oid(conn: psycopg.Connection) -> int | None:
    """The oid of pgvector's `vector` type (None: the extension is not installed)."""
    (oid,) = conn.execute("SELECT to_regtype('vector')::oid").fetchone()
    return None if oid is None else int(oid)


def register_vector_bytes(conn: psycopg.Connection, cur: psycopg.Cursor) -> int | None:
    """Load `vector` columns on `cur` as little-endian float32 bytes; returns the type's oid."""
    oid = vector_oid(conn)
    if oid is not None:
        cur.adapters.register_loader(oid, VectorBytesLoader)
    return oid


def row_columns(spaces: Sequence[str]) -> sql.Composed:
    """The docs columns `shard_row` reads, in order."""
    return sql.SQL(", ").join(
        [sql.SQL("object_type, object_id, node_kind, partition, deleted, title, body, keywords, "
                 "payload, attrs, source_updated_at, tf, len_title, len_body, pending_spaces")]
        + [sql.Identifier(f"emb_{s}") for s in spaces])


def shard_row(r: Sequence[Any], spaces: Sequence[str]) -> ShardRow:
    vectors = {s: v for s, v in zip(spaces, r[15:]) if v is not None}
    wanted = set(spaces)
    return ShardRow(
        key=(r[0], r[1], r[2]), partition=r[3], title=r[5], body=r[6],
        keywords=tuple(r[7]), payload=r[8], attrs=r[9], source_updated_at=r[10],
        tf={t: (int(c[0]), int(c[1])) for t, c in sorted(r[11].items())},
        len_title=int(r[12]), len_body=int(r[13]), vectors=vectors,
        pending=tuple(s for s in r[14] if s in wanted))


@dataclass(frozen=True, slots=True)
class PageRead:
    """A page and the last seq visible in the snapshot it was read from (`end`)."""

    page: Page
    end: int


Statement = tuple[sql.Composable, Sequence[Any]]

# One row of the page statement: a kind, then the fields of that kind (NULL elsewhere).
_META, _ENTRY, _DOC = 0, 1, 2


def read_page_gen(schema: str, partitions: Sequence[str] | str, cursor: int, limit: int,
                  spaces: Sequence[str] | None) -> Generator[Statement, list[tuple], PageRead]:
    """The page read without I/O: yields each statement to run (on a binary cursor),
    receives its rows, returns the `PageRead`. `read_page` and `read_page_async` drive
    it. The page is ONE statement, so one snapshot and one round trip: the horizon and
    the log's end, the entries, and the docs rows of their keys, as rows of three kinds.
    Without `spaces`, the server's space names are read first."""
    log = ChangeLog(schema)
    parts = check_partitions(partitions)
    if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
        raise ValidationError(f"cursor must be an integer >= 0, got {cursor!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValidationError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit!r}")
    if spaces is None:
        wanted = sorted(n for (n,) in (yield (log.q(SPACE_NAMES), ())))
    else:
        wanted = _space_names(spaces)
    rows = yield (_page_statement(log, wanted), {
        "parts": list(parts), "cursor": cursor, "limit": limit, "limit1": limit + 1})
    meta = [r for r in rows if r[0] == _META]
    ((_, horizon, end, dims),) = [r[:4] for r in meta]
    if cursor < horizon:
        raise ResyncRequired(cursor, int(horizon))
    check_known(log.schema, wanted, dims)
    entries = sorted((r[1], r[8], r[5], r[6], r[7], r[4]) for r in rows if r[0] == _ENTRY)
    current = [r[5:] for r in rows if r[0] == _DOC]
    return PageRead(_assemble(entries, current, cursor, limit, int(end), wanted,
                              {s: int(dims[s]) for s in wanted}), int(end))


SPACE_NAMES = "SELECT name FROM {s}.spaces"


_DOC_NULLS = ("NULL::text, NULL::text, NULL::text, NULL::text, NULL::boolean, NULL::text, "
              "NULL::text, NULL::jsonb, NULL::jsonb, NULL::jsonb, NULL::timestamptz, NULL::jsonb, "
              "NULL::integer, NULL::integer, NULL::text[]")


def _page_statement(log: ChangeLog, spaces: Sequence[str]) -> sql.Composed:
    """kind, horizon | seq, end, dims, op, then the docs columns (`row_columns`); an
    entry row fills object_type, object_id, node_kind and partition of those. The NULLs
    of the first branch carry the types the UNION resolves to."""
    vectors = sql.SQL("").join(sql.SQL(", NULL::vector") for _ in spaces)
    return sql.SQL("""WITH e AS (
    SELECT seq, partition, object_type, object_id, node_kind, op FROM {s}.changes
    WHERE partition = ANY(%(parts)s) AND seq > %(cursor)s ORDER BY seq LIMIT %(limit1)s)
SELECT 0, (SELECT coalesce(max(horizon), 0) FROM {s}.changelog_horizon)::bigint,
    greatest((SELECT coalesce(max(seq), 0) FROM {s}.changes),
             (SELECT coalesce(max(horizon), 0) FROM {s}.changelog_horizon))::bigint,
    (SELECT coalesce(jsonb_object_agg(name, dim), '{{}}') FROM {s}.spaces), NULL::text,
    {doc_nulls}{vectors}
UNION ALL
SELECT 1, seq, NULL, NULL, op::text, object_type, object_id, node_kind, partition,
    NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL{vectors} FROM e
UNION ALL
SELECT 2, NULL, NULL, NULL, NULL, {cols} FROM {s}.docs
WHERE (object_type, object_id, node_kind) IN (
    SELECT object_type, object_id, node_kind FROM (SELECT * FROM e ORDER BY seq LIMIT %(limit)s) p)
""").format(s=sql.Identifier(log.schema), cols=row_columns(spaces), doc_nulls=sql.SQL(_DOC_NULLS),
            vectors=vectors)


def check_known(schema: str, wanted: Sequence[str], dims: Sequence[str]) -> None:
    """`UnknownSpaceError` unless every space of `wanted` is one of the server's `dims`."""
    unknown = [s for s in wanted if s not in dims]
    if unknown:
        raise UnknownSpaceError(
            f"space(s) {unknown} are not in {schema}.docs; the server has {sorted(dims) or 'none'}")


def _space_names(spaces: Sequence[str] | str) -> list[str]:
    if isinstance(spaces, str):
        spaces = (spaces,)
    return [check_identifier(s, "embedding space") for s in dict.fromkeys(spaces)]


def _assemble(rows: list[tuple], current_rows: list[tuple], cursor: int, limit: int, end: int,
              spaces: list[str], dims: dict[str, int]) -> Page:
    has_more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = rows[-1][0] if has_more else max(cursor, end)
    last: dict[tuple[DocKey, str], str] = {}
    for _, partition, t, i, n, op in rows:
        last.pop(((t, i, n), partition), None)  # re-insert: ordered by last seq
        last[((t, i, n), partition)] = op
    current = {(r[0], r[1], r[2]): r for r in _with_le_vectors(current_rows, spaces, dims)}
    entries: list[Entry] = []
    sent: set[DocKey] = set()
    for (key, partition), op in last.items():
        row = current.get(key)
        if op == "d" or row is None or row[4] or row[3] != partition:
            entries.append(Tombstone(key, partition))
        elif key not in sent:
            sent.add(key)
            entries.append(shard_row(row, spaces))
    return Page(tuple(entries), next_cursor, has_more, cursor)


def _with_le_vectors(rows: list[tuple], spaces: list[str],
                     dims: dict[str, int]) -> list[tuple]:
    """`rows` with each vector column turned from pgvector's binary form into
    little-endian float32 bytes (one NumPy pass per space)."""
    if not rows or not spaces:
        return rows
    columns = [vectors_le([r[15 + j] for r in rows], dims[s]) for j, s in enumerate(spaces)]
    return [r[:15] + tuple(c[i] for c in columns) for i, r in enumerate(rows)]


def vectors_le(raw: list[bytes | None], dim: int) -> list[bytes | None]:
    """pgvector binary values (``>HH`` header, then big-endian float32s) as little-endian
    float32 bytes, converted in one NumPy pass; None stays None."""
    size = 4 + 4 * dim
    present = [v for v in raw if v is not None]
    if any(len(v) != size for v in present):
        raise ValidationError(f"a stored vector is not {dim}-d; the search table's space "
                              "column does not match its spaces row")
    if not present:
        return raw
    block = np.frombuffer(b"".join(present), np.uint8).reshape(len(present), size)[:, 4:]
    flat = block.view(">f4").astype("<f4").tobytes()
    step = 4 * dim
    offsets = iter(range(0, len(flat), step))
    return [None if v is None else flat[(i := next(offsets)):i + step] for v in raw]


def read_page(conn: psycopg.Connection, schema: str, partitions: Sequence[str] | str,
              cursor: int, limit: int = 1000, spaces: Sequence[str] | None = None) -> PageRead:
    """`read_page_gen` on a blocking connection (autocommit, or idle in no transaction)."""
    gen = read_page_gen(schema, partitions, cursor, limit, spaces)
    statement = next(gen)
    check_idle(conn)
    try:
        with contextlib.nullcontext() if conn.autocommit else conn.transaction():
            while True:
                with conn.cursor(binary=True) as cur:
                    rows = cur.execute(*statement).fetchall()
                try:
                    statement = gen.send(rows)
                except StopIteration as done:
                    return done.value
    except psycopg.errors.UndefinedColumn:  # a requested space has no column
        conn.rollback()
        names = [n for (n,) in conn.execute(ChangeLog(schema).q(SPACE_NAMES))]
        check_known(schema, _space_names(spaces or ()), names)
        raise


INLINE_ROWS = 64


def _advance(gen: Generator, rows: list[tuple]) -> tuple[bool, Any]:
    """(False, next statement) or (True, the result): StopIteration cannot cross a thread."""
    try:
        return False, gen.send(rows)
    except StopIteration as done:
        return True, done.value


async def read_page_async(conn: psycopg.AsyncConnection, schema: str,
                          partitions: Sequence[str] | str, cursor: int, limit: int = 1000,
                          spaces: Sequence[str] | None = None) -> PageRead:
    """`read_page` on an async connection."""
    gen = read_page_gen(schema, partitions, cursor, limit, spaces)
    statement = next(gen)
    check_idle(conn)
    if not conn.autocommit:
        raise ValidationError("read_page_async needs an autocommit connection")
    try:
        while True:
            async with conn.cursor(binary=True) as cur:
                await cur.execute(*statement)
                rows = await cur.fetchall()
            # Turning many rows into entries takes milliseconds: off the event loop.
            done, value = (_advance(gen, rows) if len(rows) <= INLINE_ROWS
                           else await asyncio.to_thread(_advance, gen, rows))
            if done:
                return value
            statement = value
    except psycopg.errors.UndefinedColumn:  # a requested space has no column
        await conn.rollback()
        cur = await conn.execute(ChangeLog(schema).q(SPACE_NAMES))
        check_known(schema, _space_names(spaces or ()), [n for (n,) in await cur.fetchall()])
        raise


def changes_since(conn: psycopg.Connection, schema: str, partitions: Sequence[str] | str,
                  cursor: int, limit: int = 1000, spaces: Sequence[str] | None = None) -> Page:
    """The next page of `partitions`' changes after `cursor` (see the module docstring),
    with the vectors of `spaces` (None: every space the server has; ``()``: none).

    Raises `ResyncRequired` when `cursor` is below the compaction horizon. The page is
    read in one snapshot of its own (one statement); `conn` is best in autocommit.
    """
    return read_page(conn, schema, partitions, cursor, limit, spaces).page
