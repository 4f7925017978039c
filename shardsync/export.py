"""Shard export: a partition's live rows, from one consistent snapshot, into a new shard file.

`export_shard` reads ``docs`` inside one REPEATABLE READ transaction as one streamed
binary ``COPY ... TO STDOUT``, writes the rows as stored — the server's analysed term
counts, not a re-analysis; the vectors of the requested spaces only, converted to
little-endian a batch at a time — and sets ``meta.cursor`` to the last change-log seq
visible in that same snapshot. Pages read from that cursor therefore continue exactly
where the shard ends.

Postgres sends the tsvector (stripped) and the vectors in their binary forms, read as
plain bytes: the doc's terms are cut out of the tsvector with two byte-string
operations (`tsv_terms`), and each space's vectors are byte-swapped for a whole batch
in one NumPy pass. Neither needs a Python call per value.

The rows are parsed in batches of `BATCH_ROWS` on the caller's thread and written by a
second thread (`_Writer`) while the next batch is read; at most `QUEUE_BATCHES` wait
between them, so memory stays bounded whatever the partition's size. The writer
(`_Sink`) builds ``docs``' secondary index once at the end and lets FTS5 buffer more
terms per segment while loading; the finished file has the format's schema and
settings. The file is built beside `path` under a temporary name (no journal: a
failure throws it away) and renamed over `path` only when complete and synced, so
`path` is never a half-written shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sqlite3
import threading
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
from .reader import check_partitions, check_spaces, vectors_le
from .shard import set_sync_meta

BATCH_ROWS = 500  # rows per batch: 500 (~2 MB) measured ~15% less CPU than 2,000
QUEUE_BATCHES = 1  # batches parsed ahead of the writer: memory stays bounded
CACHE_KIB = 65536  # the writer's page cache (bounded; the OS caches the rest of the file)
# SQLite keeps a WITHOUT ROWID row on its b-tree page only up to about page_size / 4
# bytes; a 384-d vector (1,536 bytes) spills to an overflow page of its own at the
# default 4 KiB, tripling the file. 16 KiB pages hold vectors up to ~1,000-d inline.
PAGE_SIZE = 16384
# FTS5's pending-terms buffer while exporting: 4 MiB measured ~30% less FTS5 CPU than the
# default 1 MiB (fewer segments to merge); 32 MiB was no better.
FTS_HASH_BYTES = 4 << 20


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
            _copy_rows(conn, log, parts, dims, tmp)
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


def tsv_terms(raw: bytes) -> str:
    """``docs_fts.terms`` from a stripped tsvector in binary form (a big-endian int32 count,
    then each lexeme followed by a NUL and a zero int16 position count): the lexemes in
    the tsvector's order, space-separated, each as itself when all are plain ASCII letters
    and digits (the common case, checked in one pass), else each written by `fts_token`.
    Lexemes never contain NUL, so the three NUL bytes after each are exactly the
    separators."""
    terms = raw[4:-3].replace(b"\0\0\0", b" ")
    if terms.replace(b" ", b"").isalnum():  # bytes: ASCII letters and digits only
        return terms.decode("ascii")
    return " ".join(map(fts_token, terms.decode("utf-8").split(" ")))


class _Sink:
    """The new file's one writing connection: indexes dropped and FTS5 tuned on open,
    restored on `finish`."""

    def __init__(self, tmp: Path) -> None:
        self.out = out = sqlite3.connect(tmp, isolation_level=None)
        out.execute("PRAGMA journal_mode=OFF")  # a new file: on failure it is thrown away
        out.execute("PRAGMA synchronous=OFF")
        out.execute("PRAGMA locking_mode=EXCLUSIVE")
        out.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        out.execute("BEGIN")
        # Secondary indexes are built once at the end (a sort, not a b-tree insert per
        # row), from their own CREATE statements, so the schema stays the format's.
        self.indexes = out.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                                   "AND tbl_name = 'docs' AND sql IS NOT NULL").fetchall()
        for name, _ in self.indexes:
            out.execute(f'DROP INDEX "{name}"')
        # FTS5 buffers terms up to 'hashsize' bytes before writing a segment: a larger
        # buffer writes fewer, larger segments and merges far less. Bounded, and put back
        # as it was before commit, so the shard carries the format's settings.
        self.hashsize = out.execute(
            "SELECT v FROM docs_fts_config WHERE k = 'hashsize'").fetchone()
        out.execute("INSERT INTO docs_fts (docs_fts, rank) VALUES ('hashsize', ?)",
                    (FTS_HASH_BYTES,))

    def write(self, batch) -> None:
        docs, fts, vectors = batch
        self.out.executemany(_INSERT_DOCS, docs)
        self.out.executemany(_INSERT_FTS, fts)
        self.out.executemany(_INSERT_VECTORS, vectors)

    def finish(self) -> None:
        for _, create in self.indexes:
            self.out.execute(create)
        if self.hashsize is None:
            self.out.execute("DELETE FROM docs_fts_config WHERE k = 'hashsize'")
        else:
            self.out.execute("UPDATE docs_fts_config SET v = ? WHERE k = 'hashsize'", self.hashsize)
        self.out.execute("COMMIT")

    def close(self) -> None:
        self.out.close()


class _Writer(threading.Thread):
    """Writes batches into the new file on a thread of its own, so SQLite works while the
    next batch is read and parsed (sqlite3 releases the GIL while it steps)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(name="slipstream-export-writer", daemon=True)
        self.tmp = tmp
        self.batches: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self.error: BaseException | None = None

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.batches.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        try:
            self._write()
        except BaseException as exc:  # noqa: BLE001 - the reader re-raises it
            self.error = exc
            with contextlib.suppress(queue.Empty):  # unblock a reader waiting to put
                while True:
                    self.batches.get_nowait()

    def _write(self) -> None:
        sink = _Sink(self.tmp)
        try:
            while (batch := self.batches.get()) is not None:
                if batch is _ABORT:
                    return
                sink.write(batch)
            sink.finish()
        finally:
            sink.close()


_ABORT = object()
_INSERT_DOCS = (
    "INSERT INTO docs (id, object_type, object_id, node_kind, partition, title, body, keywords, "
    "payload, attrs, source_updated_at, tf, len_title, len_body, deleted, pending_spaces, "
    "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)")
_INSERT_FTS = "INSERT INTO docs_fts (rowid, terms) VALUES (?, ?)"
_INSERT_VECTORS = "INSERT INTO vectors (doc_id, space, vec) VALUES (?, ?, ?)"


def _copy_rows(conn: psycopg.Connection, log: ChangeLog, parts: tuple[str, ...],
               dims: dict[str, int], tmp: Path) -> int:
    """Stream the rows into the new file (COPY out here, batched inserts on the writer
    thread); returns how many."""
    spaces = list(dims)
    writer = _Writer(tmp)
    writer.start()
    try:
        now = datetime.now(UTC).isoformat()
        wanted = set(spaces)
        doc_id = 0
        with conn.cursor(binary=True) as cur:
            query = sql.SQL(
                "COPY (SELECT object_type, object_id, node_kind, partition, title, body, "
                "keywords::text, payload::text, attrs::text, source_updated_at, tf::text, len_title, "
                "len_body, pending_spaces, strip(tsv){vecs} "
                "FROM {s}.docs WHERE partition = ANY({parts}) AND NOT deleted) TO STDOUT (FORMAT BINARY)"
            ).format(s=sql.Identifier(log.schema), parts=sql.Literal(list(parts)),
                     vecs=sql.SQL("").join(sql.SQL(", ") + sql.Identifier(f"emb_{s}") for s in spaces))
            with cur.copy(query) as copy:
                # tsvector and vector values arrive as their raw binary forms (bytes, no
                # per-value Python loader); a batch at a time turns them into terms and
                # little-endian float32.
                copy.set_types(["text"] * 9 + ["timestamptz", "text", "int4", "int4", "text[]", "bytea"]
                               + ["bytea"] * len(spaces))
                rows = copy.rows()
                while batch := list(islice(rows, BATCH_ROWS)):
                    first = doc_id + 1
                    docs, fts = [], []
                    for r in batch:
                        doc_id += 1
                        ts = r[9]
                        docs.append((doc_id, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8],
                                     None if ts is None else ts.isoformat(), r[10], r[11], r[12],
                                     json.dumps([s for s in r[13] if s in wanted]) if r[13] else "[]",
                                     now))
                        if len(r[14]) > 4:
                            fts.append((doc_id, tsv_terms(r[14])))
                    vectors = []
                    for j, space in enumerate(spaces):
                        le = vectors_le([r[15 + j] for r in batch], dims[space])
                        vectors.extend((first + i, space, v) for i, v in enumerate(le) if v is not None)
                    if len(spaces) > 1:
                        vectors.sort(key=lambda v: v[0])
                    writer.put((docs, fts, vectors))
        writer.put(None)
    except BaseException:
        with contextlib.suppress(BaseException):
            writer.put(_ABORT)
        raise
    finally:
        writer.join()
    if writer.error is not None:
        raise writer.error
    return doc_id
