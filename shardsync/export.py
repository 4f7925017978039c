"""Shard export: a partition's live rows, from one consistent snapshot, into a new shard file.

`export_shard` reads ``docs`` inside one REPEATABLE READ transaction as one streamed
``COPY ... TO STDOUT`` (consumed and written in batches of `BATCH_ROWS`, so memory
stays bounded whatever the partition's size), writes the rows as stored — the server's analysed term counts, not
a re-analysis; the vectors of the requested spaces only — and sets ``meta.cursor`` to
the last change-log seq visible in that same snapshot. Pages read from that cursor
therefore continue exactly where the shard ends.

The file is built beside `path` under a temporary name and renamed over `path` only
when complete and synced, so `path` is never a half-written shard.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

import psycopg
from psycopg import sql
from slipstream.index import SQLiteBackend
from slipstream.index.sqlite_backend import fts_token

from .changelog import ChangeLog, read_snapshot
from .reader import check_partitions, check_spaces, register_vector_bytes
from .shard import set_sync_meta

BATCH_ROWS = 2000
# SQLite keeps a WITHOUT ROWID row on its b-tree page only up to about page_size / 4
# bytes; a 384-d vector (1,536 bytes) spills to an overflow page of its own at the
# default 4 KiB, tripling the file. 16 KiB pages hold vectors up to ~1,000-d inline.
PAGE_SIZE = 16384


def export_shard(conn: psycopg.Connection, schema: str, partitions: Sequence[str] | str,
                 path: str | Path, spaces: Sequence[str] | None = None) -> int:
    """Write the live rows of `partitions` into a new shard at `path` (replacing any file
    there, atomically); returns the shard's cursor. `spaces`: the embedding spaces to
    carry (None: all the server's; ``()``: none, a lexical-only shard). `conn` must have
    no open transaction."""
    log = ChangeLog(schema)
    parts = check_partitions(partitions)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with read_snapshot(conn):
            dims = check_spaces(conn, log.schema, spaces)
            cursor = log.max_seq(conn)
            new = sqlite3.connect(tmp)  # before any table: rows with a vector fit a page
            new.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            new.execute("VACUUM")  # writes the header, so the page size sticks
            new.close()
            SQLiteBackend(tmp, spaces=dims).close()  # the format's schema, meta and spaces
            _copy_rows(conn, log, parts, list(dims), tmp)
        backend = SQLiteBackend(tmp)
        try:
            set_sync_meta(backend, cursor, parts)
            backend.connection.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            backend.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            leftover.unlink(missing_ok=True)
    return cursor


def fts_terms(terms: str) -> str:
    """``docs_fts.terms`` from space-separated terms: the terms themselves when all are
    plain ASCII letters and digits (the common case, checked in one pass), else each
    written by `fts_token`."""
    if terms.isascii() and terms.replace(" ", "").isalnum():
        return terms
    return " ".join(map(fts_token, terms.split(" ")))


def _copy_rows(conn: psycopg.Connection, log: ChangeLog, parts: tuple[str, ...],
               spaces: list[str], tmp: Path) -> int:
    """Stream the rows into the new file (COPY out, batched inserts); returns how many."""
    out = sqlite3.connect(tmp, isolation_level=None)
    try:
        out.execute("PRAGMA journal_mode=OFF")  # a new file: on failure it is thrown away
        out.execute("PRAGMA synchronous=OFF")
        out.execute("BEGIN")
        now = datetime.now(UTC).isoformat()
        wanted = set(spaces)
        doc_id = 0
        with conn.cursor(binary=True) as cur:
            vector_oid = register_vector_bytes(conn, cur)
            query = sql.SQL(
                "COPY (SELECT object_type, object_id, node_kind, partition, title, body, "
                "keywords::text, payload::text, attrs::text, source_updated_at, tf::text, len_title, "
                "len_body, pending_spaces, array_to_string(tsvector_to_array(tsv), ' '){vecs} "
                "FROM {s}.docs WHERE partition = ANY({parts}) AND NOT deleted) TO STDOUT (FORMAT BINARY)"
            ).format(s=sql.Identifier(log.schema), parts=sql.Literal(list(parts)),
                     vecs=sql.SQL("").join(sql.SQL(", ") + sql.Identifier(f"emb_{s}") for s in spaces))
            with cur.copy(query) as copy:
                copy.set_types(["text"] * 9 + ["timestamptz", "text", "int4", "int4", "text[]", "text"]
                               + [vector_oid] * len(spaces))
                rows = copy.rows()
                while batch := list(islice(rows, BATCH_ROWS)):
                    docs, fts, vectors = [], [], []
                    for r in batch:
                        doc_id += 1
                        docs.append((doc_id, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8],
                                     r[9].isoformat() if r[9] is not None else None, r[10], r[11],
                                     r[12], json.dumps([s for s in r[13] if s in wanted]), now))
                        if r[14]:
                            fts.append((doc_id, fts_terms(r[14])))
                        vectors.extend((doc_id, s, v) for s, v in zip(spaces, r[15:]) if v is not None)
                    out.executemany(
                        "INSERT INTO docs (id, object_type, object_id, node_kind, partition, title, body, "
                        "keywords, payload, attrs, source_updated_at, tf, len_title, len_body, deleted, "
                        "pending_spaces, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
                        docs)
                    out.executemany("INSERT INTO docs_fts (rowid, terms) VALUES (?, ?)", fts)
                    out.executemany("INSERT INTO vectors (doc_id, space, vec) VALUES (?, ?, ?)", vectors)
        out.execute("COMMIT")
        return doc_id
    finally:
        out.close()
