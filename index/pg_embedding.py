"""The embedding state of the Postgres search table: what `SearchIndex` and the worker read
and write so that the embedding service sees only what is new, and models change safely.

`PostgresBackend` inherits these methods; they use its connection helpers and tables:

* per row: ``doc_hash`` (what devices see), ``embed_hashes`` (space -> hash of the text
  embedded), ``pending_error`` — read by `stored_state`;
* ``embed_cache`` — (space, embedder id, text hash) -> float32 vector, bounded per
  space (`cache_max_rows`), least recently used first out;
* ``spaces.embedder`` / ``spaces.next_embedder`` — the embedder a space's vectors come
  from, and the one a re-embed is filling a shadow column for;
* the re-embed's shadow column ``emb_<space>__next`` with ``emb_<space>__next_hash``
  (the text hash each shadow vector embeds), filled while searches keep reading
  ``emb_<space>``, and swapped in by `switch_space` in one transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from .backend import StoredRow, check_vector
from .doc import DocKey
from .errors import ConfigurationError, EmbedderChangedError

FEW_KEYS = 16  # keys up to which a lookup by key is sent as a list of rows, not as arrays


class EmbeddingState:
    """Mixed into `PostgresBackend` (which provides `_q`, `_s`, `connection`, `_writing`,
    `spaces`, `hnsw`, `cache_max_rows` and `_cache_rows`)."""

    _s: Any
    schema: str
    spaces: dict[str, int]
    hnsw: bool
    ann_spaces: frozenset[str]
    cache_max_rows: int
    _cache_rows: dict[str, int]
    _stored_queries: dict[int, bytes] | None = None  # `stored_state_query`'s texts, composed once

    def pending_rows(self, limit: int, conn: psycopg.Connection | None = None) -> list[tuple]:
        """Live rows waiting for a vector, least recently tried first (so rows that keep
        failing do not hold back the others): (type, id, kind, partition, title, body, spaces)."""
        with self.connection(conn) as c:
            return c.execute(self._q(
                "SELECT object_type, object_id, node_kind, partition, title, body, pending_spaces "
                "FROM {s}.docs WHERE pending_spaces <> '{{}}' AND NOT deleted "
                "ORDER BY pending_tried_at NULLS FIRST, id LIMIT %s"), (limit,)).fetchall()

    def set_pending_error(self, keys: Sequence[DocKey], error: str,
                          conn: psycopg.Connection | None = None) -> None:
        """Record why the rows' pending embeddings failed again (the last error wins), and
        when, which sends them to the back of the fill pass's queue."""
        if not keys:
            return
        cols = list(zip(*keys))
        with self._writing(conn) as c:
            c.execute(sql.SQL(
                "UPDATE {s}.docs AS d SET pending_error = %s, pending_tried_at = now() "
                "FROM unnest(%s::text[], %s::text[], %s::text[]) AS k(t, i, n) "
                "WHERE d.object_type = k.t AND d.object_id = k.i AND d.node_kind = k.n"
            ).format(s=self._s), [error[:2000], list(cols[0]), list(cols[1]), list(cols[2])])

    # -- embedding state: what rows hold, the content-hash cache, the embedder per space --

    def stored_state(self, keys: Sequence[DocKey]) -> dict[DocKey, StoredRow]:
        """Fingerprint, text hashes, pending spaces and tombstone flag of the rows that exist."""
        if not keys:
            return {}
        query, params = self.stored_state_query(keys)
        with self.connection() as c:
            return self.stored_state_rows(c.execute(query, params).fetchall())

    def stored_state_query(self, keys: Sequence[DocKey]) -> tuple[bytes, list[Any]]:
        """`stored_state`'s statement and parameters, for a caller that sends it along with
        other reads in one round trip (the worker's planning). Up to `FEW_KEYS` keys go
        as a list of rows (a third of the server's planning of a join on arrays, and no
        array dumpers on the client); more go as three arrays."""
        shape = len(keys) if 0 < len(keys) <= FEW_KEYS else 0  # 0: as arrays
        queries = self._stored_queries
        if queries is None:
            queries = self._stored_queries = {}
        query = queries.get(shape)
        if query is None:
            where = ("WHERE (d.object_type, d.object_id, d.node_kind) IN ("
                     + ", ".join(["(%s, %s, %s)"] * shape) + ")" if shape else
                     "JOIN unnest(%s::text[], %s::text[], %s::text[]) AS k(t, i, n) "
                     "ON d.object_type = k.t AND d.object_id = k.i AND d.node_kind = k.n")
            query = queries[shape] = sql.SQL(
                "SELECT d.object_type, d.object_id, d.node_kind, d.doc_hash, d.embed_hashes, "
                "d.pending_spaces, d.deleted FROM {s}.docs d " + where).format(s=self._s).as_bytes(None)
        if shape:
            return query, [v for k in keys for v in k]
        cols = list(zip(*keys)) if keys else [(), (), ()]
        return query, [list(cols[0]), list(cols[1]), list(cols[2])]

    @staticmethod
    def stored_state_rows(rows: Sequence[tuple]) -> dict[DocKey, StoredRow]:
        """The rows of `stored_state_query`, by key."""
        return {(r[0], r[1], r[2]): StoredRow(r[3], r[4] or {}, tuple(r[5] or ()), bool(r[6]))
                for r in rows}

    def cache_get(self, space: str, embedder: str, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached vectors by text hash (and mark them used, for LRU eviction)."""
        if not hashes or self.cache_max_rows <= 0:
            return {}
        with self.connection() as c:
            rows = c.execute(sql.SQL(
                "UPDATE {s}.embed_cache SET used_at = now() WHERE space = %s AND embedder = %s "
                "AND text_hash = ANY(%s) RETURNING text_hash, vector").format(s=self._s),
                (space, embedder, list(hashes))).fetchall()
        dim = self.spaces[space]
        out = {}
        for h, blob in rows:
            vec = np.frombuffer(blob, dtype="<f4")
            if vec.shape == (dim,):
                out[h] = vec.astype(np.float32)
        return out

    def cache_put(self, space: str, embedder: str, vectors: Mapping[str, np.ndarray]) -> None:
        """Remember vectors by text hash; past `cache_max_rows` per space, the least
        recently used tenth goes."""
        if not vectors or self.cache_max_rows <= 0:
            return
        hs = list(vectors)
        blobs = [np.asarray(vectors[h], dtype="<f4").tobytes() for h in hs]
        with self._writing(None) as c:
            added = c.execute(sql.SQL(
                "INSERT INTO {s}.embed_cache (space, embedder, text_hash, vector) "
                "SELECT %s, %s, h, v FROM unnest(%s::text[], %s::bytea[]) AS x(h, v) "
                "ON CONFLICT (space, embedder, text_hash) DO UPDATE SET vector = excluded.vector, "
                "used_at = now()").format(s=self._s), (space, embedder, hs, blobs)).rowcount
            size = self._cache_rows.get(space)
            if size is None:
                (size,) = c.execute(sql.SQL(
                    "SELECT count(*) FROM {s}.embed_cache WHERE space = %s").format(s=self._s),
                    (space,)).fetchone()
            else:
                size += max(added, 0)
            if size > self.cache_max_rows:
                drop = size - self.cache_max_rows + self.cache_max_rows // 10
                c.execute(sql.SQL(
                    "DELETE FROM {s}.embed_cache WHERE (space, embedder, text_hash) IN ("
                    "SELECT space, embedder, text_hash FROM {s}.embed_cache WHERE space = %s "
                    "ORDER BY used_at LIMIT %s)").format(s=self._s), (space, drop))
                (size,) = c.execute(sql.SQL(
                    "SELECT count(*) FROM {s}.embed_cache WHERE space = %s").format(s=self._s),
                    (space,)).fetchone()
            self._cache_rows[space] = int(size)

    def record_embedders(self, ids: Mapping[str, str]) -> None:
        """Record the embedder of each space on first use; refuse a different one once the
        space holds vectors (an empty space just takes the new one)."""
        with self._writing(None) as c:
            for space, eid in ids.items():
                row = c.execute(self._q(
                    "SELECT embedder, next_embedder FROM {s}.spaces WHERE name = %s FOR UPDATE"),
                    (space,)).fetchone()
                if row is None:
                    continue
                current, upcoming = row
                if current == eid:
                    continue
                if current is not None and upcoming is None:
                    (has_vectors,) = c.execute(sql.SQL(
                        "SELECT EXISTS (SELECT 1 FROM {s}.docs WHERE {c} IS NOT NULL)").format(
                            s=self._s, c=sql.Identifier(f"emb_{space}"))).fetchone()
                    if has_vectors:  # else nothing to mix: the new embedder simply takes over
                        raise EmbedderChangedError(space, current, eid, upcoming)
                elif current is not None:
                    raise EmbedderChangedError(space, current, eid, upcoming)
                c.execute(self._q("UPDATE {s}.spaces SET embedder = %s WHERE name = %s"),
                          (eid, space))

    # -- re-embedding a space into a shadow column ---------------------------------------

    def _shadow(self, space: str) -> tuple[sql.Identifier, sql.Identifier, sql.Identifier]:
        return (sql.Identifier(f"emb_{space}"), sql.Identifier(f"emb_{space}__next"),
                sql.Identifier(f"emb_{space}__next_hash"))

    def _in_space(self, space: str) -> sql.Composed:
        col, _, _ = self._shadow(space)
        return sql.SQL("(embed_hashes ? {n} OR {col} IS NOT NULL OR {n} = ANY(pending_spaces))").format(
            n=sql.Literal(space), col=col)

    def begin_reembed(self, space: str, embedder: str) -> bool:
        """Prepare the shadow column for re-embedding `space` with `embedder`; False when the
        space already holds that embedder's vectors. Resumes a re-embed to the same one."""
        if space not in self.spaces:
            raise ConfigurationError(f"no space {space!r} in this index; it has {sorted(self.spaces)}")
        _, nxt, nxt_hash = self._shadow(space)
        with self._writing(None) as c:
            current, upcoming = c.execute(self._q(
                "SELECT embedder, next_embedder FROM {s}.spaces WHERE name = %s FOR UPDATE"),
                (space,)).fetchone()
            if current == embedder:
                return False
            if upcoming != embedder:
                for col in (nxt, nxt_hash):
                    c.execute(sql.SQL("ALTER TABLE {s}.docs DROP COLUMN IF EXISTS {c}").format(
                        s=self._s, c=col))
                c.execute(sql.SQL("ALTER TABLE {s}.docs ADD COLUMN {c} vector({d}), "
                                  "ADD COLUMN {h} text").format(
                    s=self._s, c=nxt, d=sql.Literal(self.spaces[space]), h=nxt_hash))
                c.execute(self._q("UPDATE {s}.spaces SET next_embedder = %s WHERE name = %s"),
                          (embedder, space))
        return True

    def shadow_progress(self, space: str) -> tuple[int, int]:
        """(rows whose shadow vector embeds their current text, rows in the space)."""
        _, _, nxt_hash = self._shadow(space)
        with self.connection() as c:
            (upcoming,) = c.execute(self._q("SELECT next_embedder FROM {s}.spaces WHERE name = %s"),
                                    (space,)).fetchone()
            if upcoming is None:  # no re-embed under way: every row is as it should be
                (total,) = c.execute(sql.SQL(
                    "SELECT count(*) FROM {s}.docs WHERE NOT deleted AND {in_space}").format(
                        s=self._s, in_space=self._in_space(space))).fetchone()
                return int(total), int(total)
            done, total = c.execute(sql.SQL(
                "SELECT count(*) FILTER (WHERE {h} = embed_hashes ->> {n}), count(*) "
                "FROM {s}.docs WHERE NOT deleted AND {in_space}").format(
                    s=self._s, h=nxt_hash, n=sql.Literal(space),
                    in_space=self._in_space(space))).fetchone()
        return int(done), int(total)

    def shadow_todo(self, space: str, limit: int, after: int = 0) -> list[tuple]:
        """Rows whose shadow vector is missing or stale: (id, key, title, body), by id."""
        _, _, nxt_hash = self._shadow(space)
        with self.connection() as c:
            rows = c.execute(sql.SQL(
                "SELECT id, object_type, object_id, node_kind, title, body FROM {s}.docs "
                "WHERE NOT deleted AND id > %s AND {in_space} AND (embed_hashes ->> {n} IS NULL "
                "OR {h} IS DISTINCT FROM embed_hashes ->> {n}) ORDER BY id LIMIT %s").format(
                    s=self._s, h=nxt_hash, n=sql.Literal(space), in_space=self._in_space(space)),
                (after, limit)).fetchall()
        return [(r[0], (r[1], r[2], r[3]), r[4], r[5]) for r in rows]

    def set_shadow(self, space: str, rows: Sequence[tuple[DocKey, Any, str]],
                   conn: psycopg.Connection | None = None) -> None:
        """Store shadow vectors (key, vector, hash of the text embedded); a row whose text
        changed since is left for the next pass."""
        _, nxt, nxt_hash = self._shadow(space)
        stmt = sql.SQL(
            "UPDATE {s}.docs SET {c} = %s, {h} = %s, embed_hashes = CASE WHEN embed_hashes ? {n} "
            "THEN embed_hashes ELSE embed_hashes || jsonb_build_object({n}, %s::text) END "
            "WHERE object_type = %s AND object_id = %s AND node_kind = %s AND NOT deleted "
            "AND coalesce(embed_hashes ->> {n}, %s) = %s").format(
                s=self._s, c=nxt, h=nxt_hash, n=sql.Literal(space))
        params = []
        for key, vector, h in rows:
            v = check_vector(space, self.spaces, vector)
            params.append((v if np.any(v) else None, h, h, *key, h, h))
        if params:
            with self._writing(conn) as c, c.cursor() as cur:
                cur.executemany(stmt, params)

    def index_shadow(self, space: str) -> None:
        """Build the shadow column's HNSW index before the switch, concurrently so the
        running worker keeps writing (no-op without HNSW). An index left invalid by an
        interrupted build is dropped and built again."""
        if not self.hnsw:
            return
        if space in self.ann_spaces:
            self.index_shadow_ann(space)
            return
        _, nxt, _ = self._shadow(space)
        name = f"docs_emb_{space}__next_hnsw"
        with self.connection() as c:  # pooled connections are in autocommit, as CONCURRENTLY needs
            row = c.execute(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
                (self.schema, name)).fetchone()
            if row is not None and row[0]:
                return
            if row is not None:
                c.execute(sql.SQL("DROP INDEX CONCURRENTLY {s}.{i}").format(
                    s=self._s, i=sql.Identifier(name)))
            c.execute(sql.SQL(
                "CREATE INDEX CONCURRENTLY {i} ON {s}.docs USING hnsw ({c} vector_cosine_ops)").format(
                    i=sql.Identifier(name), s=self._s, c=nxt))

    def switch_space(self, space: str, conn: psycopg.Connection,
                     log: Callable[[list[tuple[str, DocKey]]], None]) -> None:
        """In the caller's transaction (holding the apply writer): swap the complete shadow
        column in for `space` and record its embedder. `log` gets (partition, key) of every
        live row of the space, for the change log, while searches can still read (the
        swap's exclusive lock comes after). Refuses while rows are not done."""
        col, nxt, nxt_hash = self._shadow(space)
        conn.execute(sql.SQL("LOCK TABLE {s}.docs IN SHARE ROW EXCLUSIVE MODE").format(s=self._s))
        (left,) = conn.execute(sql.SQL(
            "SELECT count(*) FROM {s}.docs WHERE NOT deleted AND {in_space} AND "
            "(embed_hashes ->> {n} IS NULL OR {h} IS DISTINCT FROM embed_hashes ->> {n})").format(
                s=self._s, h=nxt_hash, n=sql.Literal(space), in_space=self._in_space(space))).fetchone()
        if left:
            raise ConfigurationError(
                f"{left} rows of space {space!r} have no re-embedded vector yet; run "
                f"`slipstream reembed --space {space}` again to finish them before the switch")
        keys = conn.execute(sql.SQL(
            "SELECT partition, object_type, object_id, node_kind FROM {s}.docs "
            "WHERE NOT deleted AND {in_space} ORDER BY id").format(
                s=self._s, in_space=self._in_space(space))).fetchall()
        log([(r[0], (r[1], r[2], r[3])) for r in keys])
        conn.execute(sql.SQL(
            "UPDATE {s}.docs SET pending_spaces = array_remove(pending_spaces, {n}) "
            "WHERE {n} = ANY(pending_spaces) AND {h} IS NOT NULL").format(
                s=self._s, n=sql.Literal(space), h=nxt_hash))
        old = sql.Identifier(f"emb_{space}__old")
        for stmt in ("ALTER TABLE {s}.docs RENAME COLUMN {col} TO {old}",
                     "ALTER TABLE {s}.docs RENAME COLUMN {nxt} TO {col}",
                     "ALTER TABLE {s}.docs DROP COLUMN {old}",
                     "ALTER TABLE {s}.docs DROP COLUMN {nxt_hash}"):
            conn.execute(sql.SQL(stmt).format(s=self._s, col=col, nxt=nxt, old=old, nxt_hash=nxt_hash))
        conn.execute(sql.SQL("ALTER TABLE {s}.docs ALTER COLUMN {col} SET STORAGE MAIN").format(
            s=self._s, col=col))
        if space in self.ann_spaces:
            self.switch_ann(conn, space)
        elif self.hnsw:
            conn.execute(sql.SQL("ALTER INDEX IF EXISTS {s}.{i} RENAME TO {j}").format(
                s=self._s, i=sql.Identifier(f"docs_emb_{space}__next_hnsw"),
                j=sql.Identifier(f"docs_emb_{space}_hnsw")))
        conn.execute(self._q(
            "UPDATE {s}.spaces SET embedder = next_embedder, next_embedder = NULL WHERE name = %s"),
            (space,))
