"""The change-log reader: a partition's changes since a cursor, as pages of current rows.

`changes_since` reads, in one REPEATABLE READ snapshot, the log entries of the
requested partitions after `cursor` (in seq order, at most `limit`), and turns each
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

from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.adapt import Loader
from psycopg.pq import Format
from slipstream.index.doc import DocKey, check_identifier
from slipstream.index.errors import UnknownSpaceError, ValidationError

from .changelog import ChangeLog, read_snapshot
from .entries import Entry, Page, ShardRow, Tombstone
from .errors import ResyncRequired

__all__ = ["Entry", "Page", "ShardRow", "Tombstone", "changes_since"]

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


def changes_since(conn: psycopg.Connection, schema: str, partitions: Sequence[str] | str,
                  cursor: int, limit: int = 1000, spaces: Sequence[str] | None = None) -> Page:
    """The next page of `partitions`' changes after `cursor` (see the module docstring),
    with the vectors of `spaces` (None: every space the server has; ``()``: none).

    Raises `ResyncRequired` when `cursor` is below the compaction horizon. `conn` must
    have no open transaction; the page is read in one snapshot of its own.
    """
    log = ChangeLog(schema)
    parts = check_partitions(partitions)
    if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
        raise ValidationError(f"cursor must be an integer >= 0, got {cursor!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValidationError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit!r}")
    with read_snapshot(conn):
        horizon = log.horizon(conn)
        if cursor < horizon:
            raise ResyncRequired(cursor, horizon)
        dims = check_spaces(conn, log.schema, spaces)
        rows = conn.execute(log.q(
            "SELECT seq, partition, object_type, object_id, node_kind, op FROM {s}.changes "
            "WHERE partition = ANY(%s) AND seq > %s ORDER BY seq LIMIT %s"),
            (list(parts), cursor, limit + 1)).fetchall()
        has_more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = rows[-1][0] if has_more else max(cursor, log.max_seq(conn))
        last: dict[tuple[DocKey, str], str] = {}
        for _, partition, t, i, n, op in rows:
            last.pop(((t, i, n), partition), None)  # re-insert: ordered by last seq
            last[((t, i, n), partition)] = op
        current = _current_rows(conn, log, list(dict.fromkeys(k for k, _ in last)), list(dims))
    entries: list[Entry] = []
    sent: set[DocKey] = set()
    for (key, partition), op in last.items():
        row = current.get(key)
        if op == "d" or row is None or row[4] or row[3] != partition:
            entries.append(Tombstone(key, partition))
        elif key not in sent:
            sent.add(key)
            entries.append(shard_row(row, list(dims)))
    return Page(tuple(entries), next_cursor, has_more, cursor)


def _current_rows(conn: psycopg.Connection, log: ChangeLog, keys: list[DocKey],
                  spaces: list[str]) -> dict[DocKey, tuple]:
    if not keys:
        return {}
    cols = list(zip(*keys))
    with conn.cursor(binary=True) as cur:
        if spaces:
            register_vector_bytes(conn, cur)
        cur.execute(sql.SQL(
            "SELECT {cols} FROM {s}.docs WHERE (object_type, object_id, node_kind) IN "
            "(SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]))").format(
                cols=row_columns(spaces), s=sql.Identifier(log.schema)),
            [list(cols[0]), list(cols[1]), list(cols[2])])
        return {(r[0], r[1], r[2]): r for r in cur.fetchall()}
