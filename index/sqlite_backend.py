"""The SQLite backend: a device shard, searchable offline. Standard library and NumPy only.

The file is the shard interchange format, version 1 (documented in docs/shard-format.md):

* ``meta(key, value)`` — ``format_version``, ``analyzer``, ``generation`` (bumped by
  every write transaction) and, for synced shards, ``cursor``.
* ``migrations(version, name, applied_at)`` — schema versions applied.
* ``spaces(name, dim)`` — the embedding spaces this shard carries.
* ``docs`` — one row per (object_type, object_id, node_kind), with the analysed term
  frequencies as JSON ``{"term": [title_tf, body_tf]}``, field lengths, and a
  ``deleted`` flag (tombstones keep their key and partition, nothing else).
* ``docs_fts`` — FTS5 over the analysed terms, space-separated, each written by
  `fts_token` (terms are already normalised and stemmed; FTS5 only finds candidates,
  it never re-stems or scores).
* ``vectors(doc_id, space, vec)`` — little-endian float32 blobs.

Queries run on `ShardCache`: postings and one float32 matrix per space in memory,
kept in step with this backend's own writes and reloaded when another connection
changed the shard. BM25 is vectorised over the postings; the semantic channel reads
int8 codes first and the float32 rows of the few candidates (`quantize`).
`search_fused` answers a whole query over slot numbers, building objects only for
the rows it returns.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .analysis import ANALYZER
from .backend import Filters, PreparedDoc, Retrieved, Scope, check_vector
from .doc import DocKey, SearchResult, SearchResults, check_identifier
from .errors import ConfigurationError
from .ranking import LexicalCandidate, ScopeStats, fuse_ids_and_collapse, parse_tf, rank_ids
from .scope_view import ScopeView
from .shard_cache import CachedRow, ShardCache

FORMAT_VERSION = 1

_MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "shard format 1", """
CREATE TABLE IF NOT EXISTS spaces (name TEXT PRIMARY KEY, dim INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS docs (
    id INTEGER PRIMARY KEY,
    object_type TEXT NOT NULL,
    object_id TEXT NOT NULL,
    node_kind TEXT NOT NULL,
    partition TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    body TEXT NOT NULL DEFAULT '',
    keywords TEXT NOT NULL DEFAULT '[]',
    payload TEXT NOT NULL DEFAULT '{}',
    attrs TEXT NOT NULL DEFAULT '{}',
    source_updated_at TEXT,
    tf TEXT NOT NULL DEFAULT '{}',
    len_title INTEGER NOT NULL DEFAULT 0,
    len_body INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0,
    pending_spaces TEXT NOT NULL DEFAULT '[]',
    updated_at TEXT NOT NULL,
    UNIQUE (object_type, object_id, node_kind)
);
CREATE INDEX IF NOT EXISTS docs_scope ON docs (partition, deleted, len_title, len_body);
CREATE VIRTUAL TABLE IF NOT EXISTS docs_fts USING fts5 (terms, tokenize = 'unicode61 remove_diacritics 0');
CREATE TABLE IF NOT EXISTS vectors (
    doc_id INTEGER NOT NULL,
    space TEXT NOT NULL,
    vec BLOB NOT NULL,
    PRIMARY KEY (doc_id, space)
) WITHOUT ROWID;
"""),
]


def fts_token(term: str) -> str:
    """How a term is written into ``docs_fts``: itself when plain ASCII letters and digits,
    else ``x`` + hex of its UTF-8 — so FTS5's tokenizer never splits or folds a term."""
    return term if term.isascii() and term.isalnum() else "x" + term.encode("utf-8").hex()


def fts_match(terms: Sequence[str]) -> str:
    """An FTS5 query matching rows that hold any of `terms`."""
    return " OR ".join(f'"{fts_token(t)}"' for t in terms)


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


def attrs_sql(attrs: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """SQL testing attrs containment for scalar values, with the same meaning as jsonb `@>`."""
    parts: list[str] = []
    params: list[Any] = []
    for key, value in attrs.items():
        path = f"$.{check_identifier(key, 'attrs filter key')}"
        if value is None:
            parts.append("json_type(attrs, ?) = 'null'")
            params.append(path)
        elif isinstance(value, bool):
            parts.append("json_type(attrs, ?) = ?")
            params += [path, "true" if value else "false"]
        elif isinstance(value, (int, float)):
            parts.append("(json_type(attrs, ?) IN ('integer', 'real') AND json_extract(attrs, ?) = ?)")
            params += [path, path, value]
        else:
            parts.append("(json_type(attrs, ?) = 'text' AND json_extract(attrs, ?) = ?)")
            params += [path, path, value]
    return (" AND ".join(parts) or "1"), params


def filters_sql(filters: Filters) -> tuple[str, list[Any]]:
    parts: list[str] = []
    params: list[Any] = []
    if filters.object_types is not None:
        parts.append(f"object_type IN ({_placeholders(len(filters.object_types))})")
        params += filters.object_types
    if filters.node_kinds is not None:
        parts.append(f"node_kind IN ({_placeholders(len(filters.node_kinds))})")
        params += filters.node_kinds
    if filters.attrs:
        sql, p = attrs_sql(filters.attrs)
        parts.append(sql)
        params += p
    return (" AND ".join(parts) or "1"), params


def scope_sql(scope: Scope) -> tuple[str, list[Any]]:
    if scope.partitions is None:
        return "1", []
    return f"partition IN ({_placeholders(len(scope.partitions))})", list(scope.partitions)


class SQLiteBackend:
    """A search index in one SQLite file (or ``:memory:``), in shard format 1."""

    requires_scope = False

    def __init__(self, path: str | Path = ":memory:", *, spaces: Mapping[str, int] | None = None) -> None:
        self.path = str(path)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._cache: ShardCache | None = None
        self._selection_memo: tuple[Any, np.ndarray] | None = None
        self._recent: dict[DocKey, int] = {}  # key -> docs.id of the rows the last query ranked
        self._ranked_slots: list[list[int]] = []
        self._check_fts5()
        if self.path != ":memory:":
            self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._migrate()
        self.spaces = self._init_spaces(dict(spaces or {}))

    # -- schema ---------------------------------------------------------------------------

    def _check_fts5(self) -> None:
        try:
            self._conn.execute("CREATE VIRTUAL TABLE temp.fts5_probe USING fts5(x)")
            self._conn.execute("DROP TABLE temp.fts5_probe")
        except sqlite3.OperationalError as exc:
            raise ConfigurationError(
                "this SQLite build lacks the FTS5 extension; use a Python whose bundled SQLite has FTS5"
            ) from exc

    def _migrate(self) -> None:
        c = self._conn
        with self._lock:
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                c.execute(
                    "CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, "
                    "name TEXT NOT NULL, applied_at TEXT NOT NULL)"
                )
                done = {v for (v,) in c.execute("SELECT version FROM migrations")}
                for version, name, script in _MIGRATIONS:
                    if version in done:
                        continue
                    for statement in filter(str.strip, script.split(";\n")):
                        c.execute(statement)
                    c.execute("INSERT INTO migrations VALUES (?, ?, ?)", (version, name, _now()))
                meta = dict(c.execute("SELECT key, value FROM meta").fetchall())
                if meta.get("analyzer", ANALYZER) != ANALYZER:
                    raise ConfigurationError(
                        f"shard {self.path} was analysed with {meta['analyzer']!r}, this library uses "
                        f"{ANALYZER!r}; re-export the shard"
                    )
                c.executemany(
                    "INSERT OR IGNORE INTO meta VALUES (?, ?)",
                    [("format_version", str(FORMAT_VERSION)), ("analyzer", ANALYZER), ("generation", "0")],
                )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def _init_spaces(self, wanted: dict[str, int]) -> dict[str, int]:
        existing = dict(self._conn.execute("SELECT name, dim FROM spaces").fetchall())
        for name, dim in wanted.items():
            check_identifier(name, "embedding space")
            if not isinstance(dim, int) or dim < 1:
                raise ConfigurationError(f"space {name!r} needs a positive integer dimension, got {dim!r}")
            if name in existing and existing[name] != dim:
                raise ConfigurationError(
                    f"space {name!r} is {existing[name]}-d in {self.path}, not {dim}-d; "
                    "use the shard's dimension or a new shard"
                )
        new = [(n, d) for n, d in wanted.items() if n not in existing]
        if new:
            with self._tx():
                self._conn.executemany("INSERT INTO spaces VALUES (?, ?)", new)
        return {**existing, **wanted}

    @contextmanager
    def _tx(self) -> Iterator[int]:
        """One write transaction, yielding the generation it started from; bumps it on commit."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._generation()
                self._conn.execute(
                    "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"
                )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @property
    def connection(self) -> sqlite3.Connection:
        return self._conn

    def meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self._conn.close()

    # -- writes ---------------------------------------------------------------------------

    def write(self, docs: Sequence[PreparedDoc]) -> None:
        rows = []
        for p in docs:
            vectors = {s: check_vector(s, self.spaces, v) for s, v in p.vectors.items() if v is not None}
            rows.append((p, vectors))
        if not rows:
            return
        c = self._conn
        now = _now()
        cached: list[CachedRow] = []
        with self._tx() as generation:
            for p, vectors in rows:
                d = p.doc
                shown = (d.partition, d.title, json.dumps(d.payload), json.dumps(d.attrs))
                (doc_id,) = c.execute(
                    """INSERT INTO docs (object_type, object_id, node_kind, partition, title, body,
                           keywords, payload, attrs, source_updated_at, tf, len_title, len_body,
                           deleted, pending_spaces, updated_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)
                       ON CONFLICT (object_type, object_id, node_kind) DO UPDATE SET
                           partition = excluded.partition, title = excluded.title, body = excluded.body,
                           keywords = excluded.keywords, payload = excluded.payload,
                           attrs = excluded.attrs, source_updated_at = excluded.source_updated_at,
                           tf = excluded.tf, len_title = excluded.len_title,
                           len_body = excluded.len_body, deleted = 0,
                           pending_spaces = excluded.pending_spaces, updated_at = excluded.updated_at
                       RETURNING id""",
                    (
                        d.object_type, d.object_id, d.node_kind, d.partition, d.title, d.body,
                        json.dumps(list(d.keywords)), shown[2], shown[3],
                        d.source_updated_at.isoformat() if d.source_updated_at else None,
                        json.dumps(p.lexical.tf, separators=(",", ":")),
                        p.lexical.len_title, p.lexical.len_body, json.dumps(list(p.pending)), now,
                    ),
                ).fetchone()
                c.execute("DELETE FROM docs_fts WHERE rowid = ?", (doc_id,))
                if p.lexical.tf:
                    c.execute("INSERT INTO docs_fts (rowid, terms) VALUES (?, ?)",
                              (doc_id, " ".join(map(fts_token, p.lexical.tf))))
                c.execute("DELETE FROM vectors WHERE doc_id = ?", (doc_id,))
                c.executemany(
                    "INSERT INTO vectors (doc_id, space, vec) VALUES (?, ?, ?)",
                    [(doc_id, s, v.astype("<f4").tobytes()) for s, v in vectors.items()],
                )
                cached.append(CachedRow(doc_id, d.key, d.partition, p.lexical.len_title,
                                        p.lexical.len_body, p.lexical.tf, vectors, shown))
            self._after_write(generation, lambda cache: cache.add(cached))

    def delete(self, object_type: str, object_id: str, node_kind: str | None = None) -> int:
        c = self._conn
        with self._tx() as generation:
            sql = "SELECT id FROM docs WHERE object_type = ? AND object_id = ? AND deleted = 0"
            params: list[Any] = [object_type, object_id]
            if node_kind is not None:
                sql += " AND node_kind = ?"
                params.append(node_kind)
            ids = [i for (i,) in c.execute(sql, params)]
            for doc_id in ids:
                self._tombstone(doc_id)
            self._after_write(generation, lambda cache: cache.remove(ids))
        return len(ids)

    def _after_write(self, generation: int, apply) -> None:
        """Keep the cache in step with our own write; drop it if someone else wrote since."""
        cache = self._cache
        if cache is None:
            return
        if cache.generation != generation:
            self._cache = None
            return
        apply(cache)
        cache.generation = generation + 1

    def _tombstone(self, doc_id: int) -> None:
        c = self._conn
        c.execute(
            """UPDATE docs SET deleted = 1, title = '', body = '', keywords = '[]', payload = '{}',
                   attrs = '{}', tf = '{}', len_title = 0, len_body = 0, pending_spaces = '[]',
                   updated_at = ? WHERE id = ?""",
            (_now(), doc_id),
        )
        c.execute("DELETE FROM docs_fts WHERE rowid = ?", (doc_id,))
        c.execute("DELETE FROM vectors WHERE doc_id = ?", (doc_id,))

    # -- reads ----------------------------------------------------------------------------

    def _generation(self) -> int:
        (value,) = self._conn.execute(
            "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'generation'").fetchone()
        return int(value)

    def cache(self) -> ShardCache:
        """The in-memory structures, loaded (or reloaded after another connection wrote)."""
        with self._lock:
            generation = self._generation()
            if self._cache is None or self._cache.generation != generation:
                self._cache = self._load_cache(generation)
            return self._cache

    def _load_cache(self, generation: int) -> ShardCache:
        cache = ShardCache(self.spaces, generation)
        vectors: dict[int, dict[str, np.ndarray]] = {}
        for doc_id, space, blob in self._conn.execute(
                "SELECT v.doc_id, v.space, v.vec FROM vectors v JOIN docs d ON d.id = v.doc_id "
                "WHERE d.deleted = 0"):
            if space in self.spaces:
                vectors.setdefault(doc_id, {})[space] = np.frombuffer(blob, dtype="<f4")
        rows = self._conn.execute(
            "SELECT id, object_type, object_id, node_kind, partition, len_title, len_body, tf, "
            "title, payload, attrs FROM docs WHERE deleted = 0 ORDER BY id")
        cache.add(CachedRow(r[0], (r[1], r[2], r[3]), r[4], r[5], r[6],
                            {t: (v[0], v[1]) for t, v in json.loads(r[7]).items()},
                            vectors.get(r[0], {}), (r[4], r[8], r[9], r[10])) for r in rows)
        cache.merge()
        cache.trim()
        return cache

    def _selection(self, cache: ShardCache, scope: Scope,
                   filters: Filters) -> tuple[ScopeView, np.ndarray | None]:
        """The scope's view and the filters' mask over the cache's slots (None: no filters).
        The last mask is remembered: both channels of one query ask for it."""
        view = cache.scope_view(scope.partitions)
        if filters.object_types is None and filters.node_kinds is None and not filters.attrs:
            return view, None
        memo_key = (id(cache), cache.generation, len(cache.keys), scope, repr(filters))
        if self._selection_memo is not None and self._selection_memo[0] == memo_key:
            return view, self._selection_memo[1]
        selected = cache.filter_mask(view, filters.object_types, filters.node_kinds)
        if selected is None:
            selected = view.mask.copy()
        if filters.attrs:
            sql, params = attrs_sql(filters.attrs)
            allowed = np.fromiter(
                (i for (i,) in self._conn.execute(f"SELECT id FROM docs WHERE deleted = 0 AND {sql}", params)),
                dtype=np.int64)
            selected &= np.isin(cache.doc_ids.view, allowed)
        self._selection_memo = (memo_key, selected)
        return view, selected

    def scope_stats(self, scope: Scope) -> ScopeStats:
        return self.cache().scope_view(scope.partitions).stats

    def retrieve(self, terms: Sequence[str], space: str | None, query: np.ndarray | None,
                 scope: Scope, filters: Filters, depth: int) -> Retrieved:
        cache = self.cache()  # one generation check per query
        stats = cache.scope_view(scope.partitions).stats
        self._ranked_slots = []
        lexical = self._lexical(cache, terms, scope, filters, depth)
        scores = None
        if query is None or space is None:
            keys, vectors = [], np.zeros((0, 0), np.float32)
        else:
            keys, vectors, scores = self._semantic(cache, space, query, scope, filters, depth)
        self._recent_from = (cache, self._ranked_slots)  # for `fetch`, mapped only when asked
        self._recent = None
        return Retrieved(stats, lexical, keys, vectors, False, scores)

    def lexical_rank(self, terms: Sequence[str], scope: Scope, filters: Filters, stats: ScopeStats,
                     depth: int) -> list[tuple[DocKey, float]]:
        """The top `depth` rows by BM25, computed with NumPy over the in-memory postings.

        `stats` must be the scope's (`scope_stats`); the cached view already holds them."""
        return self._lexical(self.cache(), terms, scope, filters, depth)

    def _lexical(self, cache: ShardCache, terms: Sequence[str], scope: Scope, filters: Filters,
                 depth: int) -> list[tuple[DocKey, float]]:
        if not terms:
            return []
        view, selected = self._selection(cache, scope, filters)
        ranked, slots = cache.lexical_top(view, selected, terms, depth)
        self._ranked_slots.append(slots)
        return ranked

    def lexical_candidates(self, terms: Sequence[str], scope: Scope, filters: Filters) -> list[LexicalCandidate]:
        """Candidates straight from FTS5 and the stored term frequencies, for the reference scorer.

        This is the plain-SQL path another reader of the shard format would take; the
        tests check it ranks exactly as `lexical_rank` does.
        """
        if not terms:
            return []
        where, sparams = scope_sql(scope)
        fsql, fparams = filters_sql(filters)
        tf_cols = ", ".join("json_extract(d.tf, ?)" for _ in terms)
        paths = ['$."' + t + '"' for t in terms]
        sql = (
            f"SELECT d.object_type, d.object_id, d.node_kind, d.len_title, d.len_body, ({fsql}), {tf_cols} "
            f"FROM docs_fts JOIN docs d ON d.id = docs_fts.rowid "
            f"WHERE docs_fts MATCH ? AND {where} AND d.deleted = 0"
        )
        rows = self._conn.execute(sql, [*fparams, *paths, fts_match(terms), *sparams]).fetchall()
        return [
            LexicalCandidate(
                key=(r[0], r[1], r[2]), len_title=r[3], len_body=r[4],
                tfs=tuple(parse_tf(v) for v in r[6:]), selected=bool(r[5]),
            )
            for r in rows
        ]

    def _semantic(self, cache: ShardCache, space: str, query: np.ndarray, scope: Scope,
                  filters: Filters, depth: int) -> tuple[list[DocKey], np.ndarray, np.ndarray]:
        """Every row that may rank in the exact top `depth`, with its vector and exact cosine.

        A first pass over int8 codes bounds each row's cosine from above (`quantize`);
        the rows whose bound cannot reach the exact top `depth` are dropped unread.
        """
        view, selected = self._selection(cache, scope, filters)
        keys, vectors, scores, slots = cache.semantic_top(view, selected, space, query, depth)
        self._ranked_slots.append(slots)
        return keys, vectors, scores

    def search_fused(self, terms: Sequence[str], space: str | None, query: np.ndarray | None,
                     scope: Scope, filters: Filters, depth: int, *, mode: str, min_score: float | None,
                     collapse: bool, group_of: Callable[[DocKey], object] | None, cap: int | None,
                     k: int) -> SearchResults:
        """`retrieve`, the channels' ranking, fusion, collapse and the result rows in one pass
        over slot numbers: the same results as `SearchIndex.search` assembles from
        `retrieve` and `fetch`, and only the rows returned become objects."""
        cache = self.cache()
        view, selected = self._selection(cache, scope, filters)
        key_of = cache.keys.__getitem__
        lexical: tuple[list[int], list[float]] = ([], [])
        semantic: tuple[list[int], list[float]] = ([], [])
        if terms:
            slots, scores = view.top_rows(terms, selected, depth)
            lexical = rank_ids(slots, scores, depth, key_of)
        if query is not None and space is not None:
            slots, cosines = cache.semantic_ids(view, selected, space, query, depth)
            hit = (cosines > 0.0) & (cosines >= (0.0 if min_score is None else min_score))
            semantic = rank_ids(slots[hit], cosines[hit], depth, key_of)
        self._ranked_slots = [lexical[0], semantic[0]]
        self._recent_from, self._recent = (cache, self._ranked_slots), None
        chosen = fuse_ids_and_collapse(lexical, semantic, mode=mode, key_of=key_of, collapse=collapse,
                                       group_of=group_of, cap=cap, k=k, one_kind=cache.one_node_kind())
        doc_ids, shown_by_id = cache.doc_ids.data, cache.shown
        results = []
        for slot, f, kinds in chosen:
            shown = shown_by_id.get(int(doc_ids[slot]))
            if shown is None:  # a row the cache was given without what it shows: read it
                row = self.fetch([f.key]).get(f.key)
                if row is None:
                    continue
                partition, title, payload, attrs = row["partition"], row["title"], row["payload"], row["attrs"]
            else:
                partition, title = shown[0], shown[1]
                payload, attrs = json.loads(f"[{shown[2]},{shown[3]}]")  # two JSON texts, one parse
            key = f.key
            results.append(SearchResult(key[0], key[1], key[2], partition, title, payload, attrs, f.score,
                                        f.match_type, f.lexical_rank, f.semantic_rank, f.lexical_score,
                                        f.semantic_score, kinds))
        return SearchResults(results, approximate=False, scope_size=view.stats.n_docs)

    def fetch(self, keys: Sequence[DocKey]) -> dict[DocKey, dict[str, Any]]:
        out: dict[DocKey, dict[str, Any]] = {}
        recent = self._recent
        if recent is None:  # the rows the last query ranked, by key: their doc ids
            cache, parts = self._recent_from
            ranked = [slot for part in parts for slot in part]
            recent = self._recent = dict(zip(map(cache.keys.__getitem__, ranked),
                                             cache.doc_ids.view[ranked].tolist()))
        if recent:  # rows the last query ranked: as the in-memory copy held them then
            shown_by_id = self._recent_from[0].shown
            for key in keys:
                shown = shown_by_id.get(recent.get(key))
                if shown is not None:
                    partition, title, payload, attrs = shown
                    out[key] = {"partition": partition, "title": title,
                                "payload": json.loads(payload), "attrs": json.loads(attrs)}
        lookup = self._conn.cursor()
        for key in keys:  # any other: one unique-index probe each (k is small)
            if key in out:
                continue
            row = lookup.execute(
                "SELECT partition, title, payload, attrs FROM docs "
                "WHERE object_type = ? AND object_id = ? AND node_kind = ?", key).fetchone()
            if row is not None:
                out[key] = {"partition": row[0], "title": row[1],
                            "payload": json.loads(row[2]), "attrs": json.loads(row[3])}
        return out

    def get(self, object_type: str, object_id: str, node_kind: str = "leaf") -> dict[str, Any] | None:
        """One stored row (tombstones included) as a dict, for inspection and tests."""
        cur = self._conn.execute(
            "SELECT * FROM docs WHERE object_type = ? AND object_id = ? AND node_kind = ?",
            (object_type, object_id, node_kind),
        )
        row = cur.fetchone()
        if row is None:
            return None
        out = dict(zip([c[0] for c in cur.description], row))
        out["vectors"] = {
            s: np.frombuffer(v, dtype="<f4").copy()
            for s, v in self._conn.execute("SELECT space, vec FROM vectors WHERE doc_id = ?", (out["id"],))
        }
        return out


def _now() -> str:
    return datetime.now(UTC).isoformat()
