"""The server's in-process cache of partition scopes, checked against the change log on every query.

A partition's rows are spread over as many heap pages as it has rows, so reading
them for each query costs more than ranking them. `ScopeCache` keeps, per scope (a
sorted tuple of partitions), a `ShardCache` of its live rows — the device's
structures: postings, float32 vectors and int8 codes — plus what results show of
each row (`ResultRows`), and `PostgresBackend` ranks from it with the device's code,
so the results are the exact path's, bit for bit. Queries with an attrs filter, over
all partitions, or over a scope above the backend's `exact_limit` are not cached.

Validity
--------
An entry is keyed by a *version* read in the same snapshot as its rows: the change
log's horizon and, per partition, the highest seq logged for it (and the log table's
identity, so a schema dropped and set up again never matches an old entry)
(`PartitionVersions`, implemented by ``shardsync.changelog.ChangeLog``). Before every
cached answer one indexed query reads the current version; any difference and the
entry is rebuilt. This is exact because every writer of ``{schema}.docs`` that
changes what a search reads logs the change in the same transaction, under the one
apply writer, with seqs in commit order — the worker's apply (stream, initial copy,
backfill and dead-letter retry all go through it; a move logs its old partition
too), the fill pass, and re-embedding's switch (every row of the space). The other
writes leave searched columns alone: the fill pass's error marks, the shadow column
a re-embed fills, and compaction's purge of tombstoned rows. So:

* a change to a partition's rows commits with a seq above every seq visible before
  it, so that partition's highest seq rises;
* compaction drops superseded entries (the same key's later entry stays) and old
  tombstones — which can lower a partition's highest seq back to a value an entry
  was built at — but it raises the horizon to the highest seq it removed, which is
  above every seq visible when such an entry was built. The pair (horizon, highest
  seq) therefore differs from the entry's whenever the partition changed.

Writes through the backend's own methods outside the worker (``SearchIndex.upsert``
without a change log) log nothing: in this process they bump a write epoch that
voids every entry built before them, and a partition whose rows have no change-log
entry at all is never cached. A deployment that writes ``docs`` from elsewhere
without the worker must leave the cache off.

A miss is answered uncached while one builder thread fills the entry (`background`),
so a first query costs what it costs without the cache. Memory is bounded in bytes
(`ShardCache.footprint` plus the result rows, Python objects included); least
recently used entries go first, and an entry above the budget is not kept.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .backend import Filters, Retrieved
from .doc import DocKey
from .errors import ConfigurationError
from .shard_cache import ShardCache

log = logging.getLogger(__name__)

Version = tuple[int, int, tuple[int, ...]]  # (log identity, horizon, highest seq per partition)


class PartitionVersions(Protocol):
    """Reads a scope's version in one query on `conn` (inside the caller's snapshot)."""

    def partition_versions(self, conn: Any, partitions: Sequence[str]) -> Version: ...


@dataclass(frozen=True, slots=True)
class ResultRows:
    """What a result shows of each row, by slot: partition, title, and payload and attrs as
    the JSON text Postgres gives (parsed for the few rows a query returns)."""

    partitions: list[str]
    titles: list[str]
    payloads: list[str]
    attrs: list[str]

    @property
    def nbytes(self) -> int:
        return sum(sys.getsizeof(c) + sum(map(sys.getsizeof, c)) for c in
                   (self.titles, self.payloads, self.attrs)) + sys.getsizeof(self.partitions)


@dataclass(slots=True)
class Entry:
    """One scope's rows, valid while the scope's version is `version`."""

    version: Version
    epoch: int
    cache: ShardCache
    rows: ResultRows
    nbytes: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    _slot_of_key: dict[DocKey, int] | None = None

    def fetch(self, keys: Sequence[DocKey]) -> dict[DocKey, dict[str, Any]]:
        """Result rows from this entry: the state its ranking was computed on."""
        with self.lock:
            if self._slot_of_key is None:
                self._slot_of_key = {key: slot for slot, key in enumerate(self.cache.keys)}
            slot_of = self._slot_of_key
        rows, out = self.rows, {}
        for key in keys:
            slot = slot_of.get(key)
            if slot is not None:
                out[key] = {"partition": rows.partitions[slot], "title": rows.titles[slot],
                            "payload": json.loads(rows.payloads[slot]),
                            "attrs": json.loads(rows.attrs[slot])}
        return out

    def retrieve(self, parts: tuple[str, ...], terms: Sequence[str], space: str | None,
                 query: np.ndarray | None, filters: Filters, depth: int) -> Retrieved:
        """What the backend's exact path finds, from memory, with the device's code."""
        with self.lock:  # scope views keep summands as they go: one query at a time
            sc = self.cache
            view = sc.scope_view(parts)
            selected = sc.filter_mask(view, filters.object_types, filters.node_kinds)
            lexical, _ = sc.lexical_top(view, selected, terms, depth)
            keys: list[DocKey] = []
            matrix = np.zeros((0, sc.dims[space] if space else 0), np.float32)
            scores = None
            if query is not None and space is not None:
                keys, matrix, scores, _ = sc.semantic_top(view, selected, space, query, depth)
            return Retrieved(view.stats, lexical, keys, matrix, False, scores, self.fetch)


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0  # no entry, or a stale one: rebuilt
    uncacheable: int = 0  # too many rows, too large, or rows the change log does not cover
    evictions: int = 0


class ScopeCache:
    """Entries by scope, at most `max_bytes` in all, LRU. Thread-safe."""

    def __init__(self, versions: PartitionVersions, max_bytes: int = 256 * 2**20,
                 max_partitions: int = 64, background: bool = True) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ConfigurationError(f"scope cache max_bytes must be a positive integer, got {max_bytes!r}")
        if not callable(getattr(versions, "partition_versions", None)):
            raise ConfigurationError(
                "the scope cache needs the change log's versions: pass "
                "ChangeLog(schema) from slipstream.shardsync.changelog")
        self.versions = versions
        self.max_bytes = max_bytes
        self.max_partitions = max_partitions  # a scope naming more is searched uncached
        self.stats = CacheStats()
        self._entries: OrderedDict[tuple[str, ...], Entry] = OrderedDict()
        self._bytes = 0
        self._epoch = 0
        self._lock = threading.Lock()
        self._uncacheable: dict[tuple[str, ...], tuple[Version, int]] = {}
        # With `background`, a miss is answered uncached and the entry built by one worker
        # thread, so a first query never costs more than an uncached one.
        self.background = background
        self._builder: ThreadPoolExecutor | None = None
        self._building: set[tuple[str, ...]] = set()

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def epoch(self) -> int:
        return self._epoch

    def __len__(self) -> int:
        return len(self._entries)

    def holds(self, scope: tuple[str, ...]) -> bool:
        """Whether an entry for `scope` is kept (current or not)."""
        with self._lock:
            return scope in self._entries

    def wrote(self) -> None:
        """A write this process made without logging it: void every entry built so far."""
        with self._lock:
            self._epoch += 1
            self._entries.clear()
            self._uncacheable.clear()
            self._bytes = 0

    def get(self, scope: tuple[str, ...], version: Version) -> Entry | None:
        """The entry for `scope` if it was built at `version` (and since the last write)."""
        with self._lock:
            entry = self._entries.get(scope)
            if entry is not None and entry.version == version and entry.epoch == self._epoch:
                self._entries.move_to_end(scope)
                self.stats.hits += 1
                return entry
            self.stats.misses += 1
            return None

    def known_uncacheable(self, scope: tuple[str, ...], version: Version) -> bool:
        with self._lock:
            return self._uncacheable.get(scope) == (version, self._epoch)

    def mark_uncacheable(self, scope: tuple[str, ...], version: Version, epoch: int) -> None:
        with self._lock:
            self.stats.uncacheable += 1
            if len(self._uncacheable) >= 1024:
                self._uncacheable.pop(next(iter(self._uncacheable)))
            self._uncacheable[scope] = (version, epoch)

    def put(self, scope: tuple[str, ...], version: Version, epoch: int, cache: ShardCache,
            rows: ResultRows) -> Entry | None:
        """Keep `cache` and `rows` (built at `version`, `epoch`) unless too large or a write
        came in since they were read; returns the entry to rank from (None: too large)."""
        nbytes = cache.footprint() + rows.nbytes
        entry = Entry(version, epoch, cache, rows, nbytes)
        if nbytes > self.max_bytes:
            self.mark_uncacheable(scope, version, epoch)
            return None
        with self._lock:
            if epoch != self._epoch:
                return entry  # correct for this query (its own snapshot), but not kept
            old = self._entries.pop(scope, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[scope] = entry
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, gone = self._entries.popitem(last=False)
                self._bytes -= gone.nbytes
                self.stats.evictions += 1
        return entry

    def schedule(self, scope: tuple[str, ...], build: Callable[[], object]) -> None:
        """Run `build` for `scope` on the builder thread, unless it is queued already (at
        most 16 scopes wait; more are dropped, and asked for again by their next miss)."""
        with self._lock:
            if scope in self._building or len(self._building) >= 16:
                return
            self._building.add(scope)
            if self._builder is None:
                self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scope-cache")
            builder = self._builder

        def run() -> None:
            try:
                build()
            except Exception:
                log.exception("building the scope cache entry for %s failed", scope)
            finally:
                with self._lock:
                    self._building.discard(scope)

        builder.submit(run)

    def wait_built(self, *, cancel: bool = False) -> None:
        """Wait until the scheduled builds have finished (with `cancel`, only the running one)."""
        with self._lock:
            builder = self._builder
            self._builder = None
        if builder is not None:
            builder.shutdown(wait=True, cancel_futures=cancel)
