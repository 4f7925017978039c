"""Snapshot cache: a `serve` process keeps the shards it exported and brings them forward
with the change log, so the next device asking for the same partitions and spaces gets a
copy of a file instead of a fresh export.

A snapshot request takes the entry's lock (one per partitions-and-spaces key; other keys
go on in parallel) and then:

* **miss** — `export_shard` writes the entry's file (from one snapshot, as always);
* **hit, nothing new** — a page read from the entry's cursor comes back empty: the file is
  served as is, with its cursor (the device's next page read returns nothing new);
* **hit, behind** — the file is copied, the pages after its cursor are applied to the copy
  with `apply_page` (exactly what a device does), and the copy is renamed over the entry;
* **stale** — the cursor fell below the compaction horizon, the log was reset, a space
  changed, or more changes wait than re-exporting would cost (`CATCH_UP_FRACTION` of its
  rows, at least `MIN_CATCH_UP`): the entry is dropped and exported afresh.

So a served file always equals a fresh export of the partitions as of its cursor (the
same contract a device's own delta sync keeps). An entry's file is replaced by rename,
never written in place, so a response still streaming an older file is unaffected, and
so is one whose entry was evicted: the open file keeps its data. Entries are evicted
least recently used first when their files exceed `max_bytes`. The directory is the
process's own (made on start, removed on close): nothing is shared between processes
or survives a restart, so the server stays stateless over Postgres.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import psycopg
from slipstream.index import SQLiteBackend
from slipstream.index.errors import SlipstreamError

from .export import export_shard
from .reader import read_page
from .shard import apply_page

log = logging.getLogger("slipstream.sync")

PAGE_LIMIT = 1000  # entries per page while bringing an entry forward
# Bringing an entry forward costs copying its file plus about 1 ms per change applied;
# an export, about 0.07 ms per row (bench_sync: 500 changes on 10,000 rows in 0.45 s
# against 0.8 s to export them, on 50,000 rows 1.2-1.5 s against 3.5 s). At 5% of the
# rows the two are about even on a large shard, so past that the entry is re-exported.
MIN_CATCH_UP = 100
CATCH_UP_FRACTION = 0.05


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An open shard file to stream (the caller closes it), its cursor and size, and how it
    was made: ``export``, ``cached`` (served as is) or ``caught_up`` (changes applied)."""

    file: BinaryIO
    cursor: int
    size: int
    source: str


@dataclass(slots=True)
class _Entry:
    path: Path
    cursor: int
    rows: int  # live rows when exported
    applied: int  # changes applied since then
    size: int
    used: float


Key = tuple[tuple[str, ...], tuple[str, ...] | None]


class SnapshotCache:
    """Exported shards by (partitions, spaces), brought forward on each request.

    `max_bytes` 0 keeps nothing (every request exports). Blocking: call it from a worker
    thread. `parent` is where the process's own directory is made (None: the system's
    temporary directory).
    """

    def __init__(self, dsn: str, schema: str, max_bytes: int, parent: str | None = None) -> None:
        self.dsn, self.schema, self.max_bytes = dsn, schema, max_bytes
        self.directory = Path(tempfile.mkdtemp(prefix="slipstream-snapshots-", dir=parent))
        self._entries: dict[Key, _Entry] = {}
        # key -> [its lock, requests holding or waiting for it]: only keys in use have one
        self._locks: dict[Key, list] = {}
        self._guard = threading.Lock()  # the two dicts above and the counters
        self.exports = 0  # counters, for tests and logs
        self.hits = 0

    def bytes(self) -> int:
        """Disk held by the entries' files."""
        with self._guard:
            return self._held()

    def _held(self) -> int:  # with the guard held
        return sum(e.size for e in self._entries.values())

    def close(self) -> None:
        """Forget every entry and remove the directory (open files keep their data)."""
        with self._guard:
            self._entries.clear()
        shutil.rmtree(self.directory, ignore_errors=True)

    def snapshot(self, partitions: Sequence[str], spaces: Sequence[str] | None) -> Snapshot:
        """A shard of `partitions` with `spaces`, current as of its cursor, opened for reading."""
        key: Key = (tuple(sorted(partitions)), None if spaces is None else tuple(spaces))
        with self._holding(key):
            entry = self._entries.get(key)
            source = "export"
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                if entry is not None:
                    try:
                        source = self._bring_forward(conn, key, entry)
                    except (_Stale, SlipstreamError, sqlite3.Error) as exc:
                        log.info("sync: cached snapshot of %s dropped (%s); exporting afresh",
                                 list(key[0]), exc)
                        self._drop(key)
                        entry = None
                if entry is None:
                    entry = self._export(conn, key)
            file = open(entry.path, "rb")  # noqa: SIM115 - the response closes it
            entry.used = time.monotonic()
            with self._guard:  # requests for other keys count at the same time
                if source == "export":
                    self.exports += 1
                else:
                    self.hits += 1
            snap = Snapshot(file, entry.cursor, os.fstat(file.fileno()).st_size, source)
            if entry.size > self.max_bytes:
                self._drop(key)  # too large to keep: served once, like an uncached export
        self._evict()
        return snap

    # -- internals ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _holding(self, key: Key) -> Iterator[None]:
        """The key's lock, held: requests for one key run one at a time (devices of a
        shared partition starting together cost one export). A lock exists only while
        requests hold or wait for it, so the table stays as small as the work in flight."""
        with self._guard:
            slot = self._locks.setdefault(key, [threading.Lock(), 0])
            slot[1] += 1
        try:
            with slot[0]:
                yield
        finally:
            with self._guard:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._locks[key]

    def _path(self, key: Key) -> Path:
        name = hashlib.blake2b(json.dumps(key).encode(), digest_size=12).hexdigest()
        return self.directory / f"{name}.db"  # never a name taken from the request

    def _export(self, conn: psycopg.Connection, key: Key) -> _Entry:
        path = self._path(key)
        cursor = export_shard(conn, self.schema, key[0], path, key[1])
        rows = _live_rows(path)
        entry = _Entry(path, int(cursor), rows, 0, path.stat().st_size, time.monotonic())
        with self._guard:
            self._entries[key] = entry
        return entry

    def _bring_forward(self, conn: psycopg.Connection, key: Key, entry: _Entry) -> str:
        """Apply the changes after the entry's cursor to a copy and swap it in; raises
        `_Stale` (or what the reader or `apply_page` raise) when re-exporting is better."""
        read = read_page(conn, self.schema, key[0], entry.cursor, PAGE_LIMIT, key[1])
        page = read.page
        if not page.entries:
            if entry.cursor > read.end:
                raise _Stale(f"its cursor {entry.cursor} is beyond the log's end {read.end}")
            if not page.has_more:
                return "cached"
        budget = max(MIN_CATCH_UP, int(CATCH_UP_FRACTION * entry.rows)) - entry.applied
        tmp = entry.path.with_name(f".{entry.path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            shutil.copyfile(entry.path, tmp)
            shard = SQLiteBackend(tmp)
            try:
                # A private copy: a failure throws it away, so no journal and no syncs.
                shard.connection.execute("PRAGMA journal_mode=OFF")
                shard.connection.execute("PRAGMA synchronous=OFF")
                applied = 0
                while True:
                    applied += len(page.entries)
                    if applied > budget:
                        raise _Stale(f"{entry.applied + applied} changes since it was exported")
                    cursor = apply_page(shard, page)
                    if not page.has_more:
                        break
                    page = read_page(conn, self.schema, key[0], cursor, PAGE_LIMIT, key[1]).page
                shard.connection.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            finally:
                shard.close()
            os.replace(tmp, entry.path)
        finally:
            for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                leftover.unlink(missing_ok=True)
        entry.cursor, entry.applied = cursor, entry.applied + applied
        entry.size = entry.path.stat().st_size
        return "caught_up"

    def _drop(self, key: Key) -> None:
        with self._guard:
            entry = self._entries.pop(key, None)
        if entry is not None:
            entry.path.unlink(missing_ok=True)

    def _evict(self) -> None:
        """Drop least recently used entries (not being worked on) until within `max_bytes`."""
        with self._guard:
            total = self._held()
            if total <= self.max_bytes:
                return
            victims = []
            for key, entry in sorted(self._entries.items(), key=lambda kv: kv[1].used):
                if total <= self.max_bytes:
                    break
                if key in self._locks:
                    continue  # being served or brought forward
                victims.append(self._entries.pop(key))
                total -= entry.size
        for entry in victims:
            with contextlib.suppress(OSError):
                entry.path.unlink()


class _Stale(Exception):
    """The entry is better exported afresh than brought forward."""


def _live_rows(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM docs WHERE deleted = 0").fetchone()[0])
    finally:
        conn.close()
