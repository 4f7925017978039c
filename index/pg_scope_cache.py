"""The Postgres backend's reads through its scope cache (`scope_cache`): the per-query
version check, and building an entry from one snapshot of a scope's live rows.

A mixin of `PostgresBackend` (it owns the ``docs`` table; this module only reads it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import psycopg
from psycopg import sql

from .backend import Filters, Retrieved, Scope
from .errors import ConfigurationError
from .scope_cache import Entry, ResultRows, ScopeCache
from .shard_cache import ShardCache


class ScopeCacheReads:
    """Needs the backend's `scope_cache`, `spaces`, `schema`, `exact_limit`, `connection`."""

    scope_cache: ScopeCache | None
    spaces: dict[str, int]
    schema: str
    exact_limit: int
    _s: sql.Identifier

    def _retrieve_cached(self, terms: Sequence[str], space: str | None, q: np.ndarray | None,
                         scope: Scope, filters: Filters, depth: int) -> Retrieved | None:
        """The scope ranked in memory (`scope_cache`), or None when it is not cacheable: no
        cache, all partitions, an attrs filter, or a scope above `exact_limit` rows."""
        cache, parts = self.scope_cache, scope.partitions
        if cache is None or parts is None or filters.attrs or len(parts) > cache.max_partitions:
            return None
        with self.connection() as c:
            try:
                version = cache.versions.partition_versions(c, parts)  # the one check per query
            except psycopg.errors.UndefinedTable as exc:
                raise ConfigurationError(
                    f"the scope cache checks the change log, which schema {self.schema!r} does not "
                    "have: run `slipstream setup` (or ChangeLog.migrate), or leave scope_cache "
                    f"off ({exc})") from None
            entry = cache.get(parts, version)
            if entry is None:
                if cache.known_uncacheable(parts, version):
                    return None
                if cache.background:  # answered uncached now; the entry is built beside it
                    cache.schedule(parts, lambda: self._build_pooled(cache, parts))
                    return None
                entry = self._build_scope(c, cache, parts)
                if entry is None:
                    return None
        return entry.retrieve(parts, terms, space, q, filters, depth)

    def _build_pooled(self, cache: ScopeCache, parts: tuple[str, ...]) -> None:
        with self.connection() as c:
            self._build_scope(c, cache, parts)

    def _build_scope(self, c: psycopg.Connection, cache: ScopeCache,
                     parts: tuple[str, ...]) -> Entry | None:
        """Read the scope's live rows and their version in one snapshot; keep them if they fit.

        Columns come back as arrays (vectors as one bytea, term counts unnested), so the
        structures are built with NumPy, not row by row."""
        epoch = cache.epoch  # read before the snapshot: a write after it voids the entry
        where = sql.SQL("partition = ANY(%s) AND NOT deleted")
        vecs = sql.SQL("").join(sql.SQL(
            ", string_agg(coalesce(vector_send({c}), {zero}), ''::bytea ORDER BY id), "
            "array_agg({c} IS NOT NULL ORDER BY id)").format(
                c=sql.Identifier(f"emb_{sp}"),
                zero=sql.Literal(bytes(4 + 4 * dim))) for sp, dim in self.spaces.items())
        with c.transaction():
            c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            version = cache.versions.partition_versions(c, parts)
            (n,) = c.execute(sql.SQL("SELECT count(*) FROM {s}.docs WHERE {w}").format(
                s=self._s, w=where), (list(parts),)).fetchone()
            # Above the exact limit the server answers through HNSW; rows with no change-log
            # entry were written around the log, so its seq cannot tell when they change.
            if n == 0 or n > self.exact_limit or 0 in version[-1]:
                cache.mark_uncacheable(parts, version, epoch)
                return None
            rows = c.cursor(binary=True).execute(sql.SQL(
                "SELECT array_agg(id ORDER BY id), array_agg(object_type ORDER BY id), "
                "array_agg(object_id ORDER BY id), array_agg(node_kind ORDER BY id), "
                "array_agg(partition ORDER BY id), array_agg(len_title ORDER BY id), "
                "array_agg(len_body ORDER BY id), array_agg(title ORDER BY id), "
                "array_agg(payload::text ORDER BY id), array_agg(attrs::text ORDER BY id){vecs} "
                "FROM {s}.docs WHERE {w}").format(
                    s=self._s, w=where, vecs=vecs), (list(parts),)).fetchone()
            # Term counts unnested, each term numbered here: (terms, doc ids, term numbers, tfs).
            postings = c.cursor(binary=True).execute(sql.SQL(
                "WITH p AS MATERIALIZED (SELECT d.id, k.key, k.value FROM {s}.docs d, "
                "jsonb_each(d.tf) AS k WHERE d.{w}), "
                "t AS (SELECT key, (row_number() OVER (ORDER BY key))::int4 - 1 AS n "
                "FROM (SELECT DISTINCT key FROM p) x) "
                "SELECT (SELECT array_agg(key ORDER BY n) FROM t), array_agg(p.id), array_agg(t.n), "
                "array_agg((p.value ->> 0)::int4), array_agg((p.value ->> 1)::int4) "
                "FROM p JOIN t USING (key)").format(s=self._s, w=where), (list(parts),)).fetchone()
        ids, types, oids, kinds, partitions, lt, lb, titles, payloads, attrs = rows[:10]
        vectors = {}
        for i, (sp, dim) in enumerate(self.spaces.items()):
            block, has = rows[10 + 2 * i], rows[11 + 2 * i]
            # vector_send: int16 dim, int16 unused, then dim big-endian float32 per row
            matrix = np.frombuffer(block, ">f4").reshape(len(ids), dim + 1)[:, 1:].astype(np.float32)
            vectors[sp] = (matrix, np.asarray(has, bool))
        sc = ShardCache.of_arrays(self.spaces, ids, list(zip(types, oids, kinds)), partitions, lt, lb,
                                  postings[0] or [], tuple(p or [] for p in postings[1:]), vectors)
        labels = {p: p for p in set(partitions)}
        return cache.put(parts, version, epoch, sc, ResultRows(
            [labels[p] for p in partitions], titles, payloads, attrs))

