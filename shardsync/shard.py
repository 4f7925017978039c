"""A device shard that follows the change log: open it (checking its format), apply pages.

A synced shard is a `slipstream.index.SQLiteBackend` file (docs/shard-format.md) whose
``meta`` also holds ``cursor`` (it holds every change up to that seq) and
``partitions`` (a JSON array: the partitions it carries). `apply_page` writes a page's
upserts, tombstones and the new cursor in ONE SQLite transaction: a crash at any point
leaves the shard at its previous cursor, intact and searchable, and applying the same
page again changes nothing. The backend's in-memory search structures are updated in
the same step (the shard's ``generation`` moves once per page), so searches through the
same backend stay exact without a reload.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import numpy as np
from slipstream.index import SearchIndex, SQLiteBackend
from slipstream.index.analysis import ANALYZER
from slipstream.index.errors import DimensionMismatchError, UnknownSpaceError, ValidationError
from slipstream.index.shard_cache import CachedRow
from slipstream.index.sqlite_backend import FORMAT_VERSION, fts_token

from .entries import Page, ShardRow, Tombstone
from .errors import ShardFormatError

Shard = SQLiteBackend | SearchIndex


def read_meta(path: str | Path) -> dict[str, str]:
    """A shard file's ``meta`` table, read without writing anything; `ShardFormatError`
    when the file is not a slipstream shard."""
    path = Path(path)
    if not path.is_file():
        raise ShardFormatError(f"no shard file at {path}; export one first")
    try:
        conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)
        try:
            return dict(conn.execute("SELECT key, value FROM meta").fetchall())
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise ShardFormatError(
            f"{path} is not a slipstream shard ({exc}); export a new shard to that path") from exc


def check_format(meta: dict[str, str], path: str | Path) -> None:
    version, analyzer = meta.get("format_version"), meta.get("analyzer")
    if version != str(FORMAT_VERSION):
        raise ShardFormatError(
            f"shard {path} has format_version {version!r}; this slipstream reads version "
            f"{FORMAT_VERSION} only. Upgrade slipstream to read it, or export a new shard")
    if analyzer != ANALYZER:
        raise ShardFormatError(
            f"shard {path} was analysed with {analyzer!r}; this slipstream implements "
            f"{ANALYZER!r}, so its queries would not match the shard's terms. Export a new shard")


def open_shard(path: str | Path) -> SQLiteBackend:
    """Open an existing shard for search and sync, after checking its format version and
    analyzer (`ShardFormatError` if this code does not implement them; nothing is written)."""
    check_format(read_meta(path), path)
    return SQLiteBackend(path)


def _backend(shard: Shard) -> SQLiteBackend:
    backend = shard.backend if isinstance(shard, SearchIndex) else shard
    if not isinstance(backend, SQLiteBackend):
        raise ValidationError(f"expected a SQLite shard, got {type(backend).__name__}")
    return backend


def shard_cursor(shard: Shard) -> int | None:
    """The change-log seq the shard holds everything up to (None: not a synced shard)."""
    value = _backend(shard).meta("cursor")
    return None if value is None else int(value)


def shard_partitions(shard: Shard) -> tuple[str, ...] | None:
    """The partitions the shard carries (None: not recorded)."""
    value = _backend(shard).meta("partitions")
    return None if value is None else tuple(json.loads(value))


def _check_row(row: ShardRow, dims: dict[str, int]) -> None:
    for space, blob in row.vectors.items():
        if space not in dims:
            raise UnknownSpaceError(
                f"page carries vectors of space {space!r}, which this shard does not hold "
                f"(it has {sorted(dims) or 'none'}); ask for the shard's spaces only")
        if len(blob) != 4 * dims[space]:
            raise DimensionMismatchError(space, dims[space], len(blob) // 4)


def apply_page(shard: Shard, page: Page) -> int:
    """Apply `page` in one transaction; returns the shard's cursor afterwards.

    A page already applied (its `next_cursor` is not past the shard's cursor) is a
    no-op. A page read from a cursor beyond the shard's (a gap) and a page with rows of
    a partition the shard does not carry are refused before anything is written.
    """
    backend = _backend(shard)
    if not isinstance(page, Page):
        raise ValidationError(f"expected a Page, got {type(page).__name__}")
    entries = tuple(page.entries)
    cursor = shard_cursor(backend)
    if cursor is not None and page.next_cursor <= cursor:
        return cursor
    if cursor is not None and page.since is not None and page.since > cursor:
        raise ValidationError(
            f"page starts after cursor {page.since} but the shard is at {cursor}; "
            "changes in between would be missed. Read the page from the shard's cursor")
    partitions = shard_partitions(backend)
    dims = dict(backend.spaces)
    for e in entries:
        if not isinstance(e, ShardRow | Tombstone):
            raise ValidationError(f"a page entry must be a ShardRow or Tombstone, not {type(e).__name__}")
        if partitions is not None and e.partition not in partitions:
            raise ValidationError(
                f"page has an entry of partition {e.partition!r}; this shard carries "
                f"{list(partitions)} only")
        if isinstance(e, ShardRow):
            _check_row(e, dims)
    c = backend.connection
    now = datetime.now(UTC).isoformat()
    steps: list[tuple[str, list]] = []  # cache updates, replayed in write order after the SQL
    with backend._tx() as generation:
        for e in entries:
            if isinstance(e, Tombstone):
                ids = [i for (i,) in c.execute(
                    "SELECT id FROM docs WHERE object_type = ? AND object_id = ? AND node_kind = ? "
                    "AND partition = ? AND deleted = 0", (*e.key, e.partition))]
                for doc_id in ids:
                    _tombstone(c, doc_id, now)
                steps.append(("remove", ids))
            else:
                steps.append(("add", [_upsert(c, e, now)]))
        c.execute("INSERT INTO meta (key, value) VALUES ('cursor', ?) ON CONFLICT (key) "
                  "DO UPDATE SET value = excluded.value", (str(page.next_cursor),))

        def update(cache) -> None:
            for what, items in steps:
                cache.remove(items) if what == "remove" else cache.add(items)

        backend._after_write(generation, update)
    return page.next_cursor


def _tombstone(c: sqlite3.Connection, doc_id: int, now: str) -> None:
    c.execute(
        "UPDATE docs SET deleted = 1, title = '', body = '', keywords = '[]', payload = '{}', "
        "attrs = '{}', tf = '{}', len_title = 0, len_body = 0, pending_spaces = '[]', "
        "updated_at = ? WHERE id = ?", (now, doc_id))
    c.execute("DELETE FROM docs_fts WHERE rowid = ?", (doc_id,))
    c.execute("DELETE FROM vectors WHERE doc_id = ?", (doc_id,))


def _upsert(c: sqlite3.Connection, row: ShardRow, now: str) -> CachedRow:
    shown = (row.partition, row.title, json.dumps(row.payload), json.dumps(row.attrs))
    (doc_id,) = c.execute(
        """INSERT INTO docs (object_type, object_id, node_kind, partition, title, body, keywords,
               payload, attrs, source_updated_at, tf, len_title, len_body, deleted,
               pending_spaces, updated_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)
           ON CONFLICT (object_type, object_id, node_kind) DO UPDATE SET
               partition = excluded.partition, title = excluded.title, body = excluded.body,
               keywords = excluded.keywords, payload = excluded.payload, attrs = excluded.attrs,
               source_updated_at = excluded.source_updated_at, tf = excluded.tf,
               len_title = excluded.len_title, len_body = excluded.len_body, deleted = 0,
               pending_spaces = excluded.pending_spaces, updated_at = excluded.updated_at
           RETURNING id""",
        (*row.key, row.partition, row.title, row.body, json.dumps(list(row.keywords)),
         shown[2], shown[3],
         row.source_updated_at.isoformat() if row.source_updated_at else None,
         json.dumps(row.tf, separators=(",", ":")), row.len_title, row.len_body,
         json.dumps(list(row.pending)), now)).fetchone()
    # FTS5 re-tokenises both the old and the new text to update its index: skip it when
    # the terms did not change (an update of payload, attrs or vectors only).
    terms = " ".join(map(fts_token, row.tf)) if row.tf else None
    old = c.execute("SELECT terms FROM docs_fts WHERE rowid = ?", (doc_id,)).fetchone()
    if old is None or old[0] != terms:
        if old is not None:
            c.execute("DELETE FROM docs_fts WHERE rowid = ?", (doc_id,))
        if terms is not None:
            c.execute("INSERT INTO docs_fts (rowid, terms) VALUES (?, ?)", (doc_id, terms))
    c.execute("DELETE FROM vectors WHERE doc_id = ?", (doc_id,))
    c.executemany("INSERT INTO vectors (doc_id, space, vec) VALUES (?, ?, ?)",
                  [(doc_id, s, bytes(v)) for s, v in row.vectors.items()])
    return CachedRow(doc_id, row.key, row.partition, row.len_title, row.len_body,
                     {t: (int(v[0]), int(v[1])) for t, v in row.tf.items()},
                     {s: np.frombuffer(v, "<f4") for s, v in row.vectors.items()}, shown)


def set_sync_meta(backend: SQLiteBackend, cursor: int, partitions: Sequence[str]) -> None:
    """Record a fresh shard's cursor and partitions (one transaction)."""
    with backend._tx():
        backend.connection.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
            "excluded.value", [("cursor", str(cursor)), ("partitions", json.dumps(sorted(partitions)))])
