"""The Postgres backend: the server's search table (pgvector + tsvector), in a schema of its own.

Layout (schema ``slipstream`` by default, created and migrated by `create_schema`):

* ``migrations(version, name, applied_at)`` and ``spaces(name, dim)``;
* ``docs`` — one row per (object_type, object_id, node_kind): content, JSONB
  ``payload``/``attrs``, analysed term frequencies ``tf`` (JSONB ``{"term": [title, body]}``),
  ``tsv`` (the same terms as a ``tsvector``, built with ``array_to_tsvector`` — the
  ``simple`` treatment: no re-parsing, no re-stemming) with a GIN index, field lengths,
  a ``deleted`` flag for tombstones, and one ``vector(d)`` column per space;
* with HNSW, per space a side table ``ann_<space>`` carrying the HNSW cosine index, kept
  up to date from ``ann_queue`` off the write path (`pg_ann`).

With ``hnsw=False`` (exact-scan mode) no HNSW index is built or kept up, and every
semantic query is exact. Searches within a scope of at most `exact_limit` rows
(default 20,000) rank vectors
exactly: pgvector's distance picks candidates with a margin and `ranking` computes the
exact cosine. Larger scopes use HNSW with ``hnsw.iterative_scan`` and the results say
they are approximate; a filtered HNSW query that comes back short falls back to exact.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from .backend import Filters, PreparedDoc, Retrieved, Scope, check_vector
from .doc import DocKey, check_identifier
from .errors import ConfigurationError, MissingDependencyError
from .pg_migrations import apply_migrations
from .pg_schema import MIGRATIONS
from .ranking import CANDIDATE_MARGIN, ScopeStats
from .scope_cache import ScopeCache
from .scope_view import rank_candidates

try:
    import psycopg
    from psycopg import sql
    from psycopg.types.json import Jsonb
    from psycopg_pool import ConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise MissingDependencyError(
        "PostgresBackend requires the 'server' extra: pip install 'slipstream[server]'"
    ) from exc

from .pg_ann import AnnIndex
from .pg_connect import pinned_conninfo
from .pg_embedding import EmbeddingState
from .pg_scope_cache import ScopeCacheReads
from .pg_writes import WriteSQL, vector_text, write_sql

log = logging.getLogger(__name__)

DEFAULT_EXACT_LIMIT = 20_000
COPY_THRESHOLD = 64  # batches at least this large are written through a binary COPY


def tsquery_any(terms: Sequence[str]) -> str:
    """A tsquery literal matching any of `terms` (quoted lexemes, no re-parsing)."""
    return " | ".join("'" + t.replace("\\", "\\\\").replace("'", "''") + "'" for t in terms)


def check_encoding(conn: psycopg.Connection) -> None:
    """Refuse a search database whose encoding is not UTF8.

    Titles, terms and JSON hold any Unicode text: a mapper's literal (an em dash in a
    title template) or analysis itself (NFKC makes LATIN1's micro sign a Greek mu)
    yields characters a LATIN1 database cannot store, and a SQL_ASCII one rejects JSON
    escapes. The source database may keep any encoding: its values are read as UTF-8.
    """
    (encoding,) = conn.execute("SHOW server_encoding").fetchone()
    if encoding.upper() != "UTF8":
        raise ConfigurationError(
            f"the search tables need a UTF8 database, and database {conn.info.dbname!r} is "
            f"{encoding}: create one beside it (CREATE DATABASE search ENCODING 'UTF8' "
            "TEMPLATE template0) and point the search DSN at it ([search] dsn in the worker's "
            "configuration); the source database can stay as it is")


class PostgresBackend(EmbeddingState, ScopeCacheReads, AnnIndex):
    """The search table in Postgres. `conninfo` is a DSN or an open `ConnectionPool`."""

    requires_scope = True

    def __init__(self, conninfo: str | ConnectionPool, *, schema: str = "slipstream",
                 spaces: Mapping[str, int] | None = None, exact_limit: int = DEFAULT_EXACT_LIMIT,
                 ef_search: int = 100, iterative_scan: bool = True, hnsw: bool = True,
                 create_schema: bool = True, pool_size: int = 4,
                 cache_max_rows: int = 100_000, scope_cache: ScopeCache | None = None,
                 defer_ann: bool = False) -> None:
        self.schema = check_identifier(schema, "schema")
        self.spaces: dict[str, int] = {}
        for name, dim in (spaces or {}).items():
            check_identifier(name, "embedding space")
            if not isinstance(dim, int) or not 1 <= dim <= 16000:
                raise ConfigurationError(f"space {name!r} needs a dimension from 1 to 16000, got {dim!r}")
            self.spaces[name] = dim
        self.exact_limit = exact_limit
        self.ef_search = ef_search
        self.iterative_scan = iterative_scan
        self.hnsw = hnsw
        # False: each write this backend commits drains the HNSW queue before returning.
        # True: the caller drains it (the worker's `AnnIndexer`).
        self.defer_ann = defer_ann
        self.cache_max_rows = cache_max_rows  # per space; 0 turns the content-hash cache off
        # Partition scopes held in memory, checked against the change log per query (`scope_cache`).
        self.scope_cache = scope_cache
        self._cache_rows: dict[str, int] = {}
        self._s = sql.Identifier(self.schema)
        self._staged_on: dict[int, psycopg.Connection] = {}  # connections with a staging table
        self._write_sql_cache: dict[tuple[str, ...], WriteSQL] = {}  # spaces -> statements
        self._tombstone_sql: tuple[tuple[str, ...], bytes] | None = None
        if isinstance(conninfo, ConnectionPool):
            self._pool, self._owns_pool = conninfo, False
        else:
            conninfo = pinned_conninfo(conninfo)  # ISO dates whatever the database sets
            self._check_database(conninfo)
            self._pool = ConnectionPool(conninfo, min_size=1, max_size=pool_size,
                                        configure=_configure_pooled, open=True)
            self._owns_pool = True
        try:
            if create_schema:
                self.create_schema()
            else:  # a schema made elsewhere: which spaces have an HNSW side table
                with self.connection() as c:
                    self._read_ann_spaces(c)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _check_database(conninfo: str) -> None:
        """A UTF8 database with pgvector, or a `ConfigurationError` that says what to do."""
        with psycopg.connect(conninfo, autocommit=True) as conn:
            check_encoding(conn)
            try:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.Error as exc:
                raise ConfigurationError(
                    "the pgvector extension is not available in this database: install pgvector "
                    f"on the server, or have a superuser run CREATE EXTENSION vector ({exc})"
                ) from exc

    @contextmanager
    def connection(self, conn: psycopg.Connection | None = None) -> Iterator[psycopg.Connection]:
        """The caller's connection (inside its transaction), or a pooled one committed on exit."""
        if conn is not None:
            yield conn
            return
        with self._pool.connection() as pooled:
            yield pooled

    @contextmanager
    def _writing(self, conn: psycopg.Connection | None) -> Iterator[psycopg.Connection]:
        """Inside the caller's transaction when `conn` is given; else a pooled one, committed."""
        try:
            if conn is not None:
                yield conn
                return
            with self._pool.connection() as pooled, pooled.transaction():
                yield pooled
            if not self.defer_ann and self.ann_spaces:
                try:
                    self.drain_ann()
                except psycopg.Error as exc:  # the write is committed; queued rows stay searchable
                    log.warning("HNSW side table not brought up to date after a write: %s", exc)
        finally:
            if self.scope_cache is not None:  # unlogged when not the worker's: void the entries
                self.scope_cache.wrote()

    def connect(self, **kwargs: Any) -> psycopg.Connection:
        """A new dedicated connection (not from the pool), set up for vectors."""
        conn = psycopg.connect(self._pool.conninfo, **kwargs)
        _configure(conn)
        return conn

    def close(self) -> None:
        if self.scope_cache is not None:
            self.scope_cache.wait_built(cancel=True)
        if self._owns_pool:
            self._pool.close()

    def _q(self, text: str, **idents: str) -> sql.Composed:
        return sql.SQL(text).format(s=self._s, **{k: sql.Identifier(v) for k, v in idents.items()})

    # -- schema ---------------------------------------------------------------------------

    def create_schema(self) -> None:
        """Create or migrate the schema and the space columns. Idempotent; safe to run concurrently."""
        with self.connection() as conn, conn.transaction():
            apply_migrations(conn, self.schema, "migrations", MIGRATIONS)
            existing = dict(conn.execute(self._q("SELECT name, dim FROM {s}.spaces")).fetchall())
            for name, dim in self.spaces.items():
                if name in existing:
                    if existing[name] != dim:
                        raise ConfigurationError(
                            f"space {name!r} is {existing[name]}-d in {self.schema}.docs, not {dim}-d; "
                            "use the existing dimension or a new schema"
                        )
                    continue
                column = f"emb_{name}"
                conn.execute(sql.SQL("ALTER TABLE {s}.docs ADD COLUMN {c} vector({d})").format(
                    s=self._s, c=sql.Identifier(column), d=sql.Literal(dim)))
                # Inline when it fits: an exact scan reads every vector of the scope, and a
                # TOASTed vector costs an index lookup per row (about 4x the pages).
                conn.execute(sql.SQL("ALTER TABLE {s}.docs ALTER COLUMN {c} SET STORAGE MAIN").format(
                    s=self._s, c=sql.Identifier(column)))
                conn.execute(self._q("INSERT INTO {s}.spaces VALUES (%s, %s)"), (name, dim))
            for name, dim in existing.items():
                self.spaces.setdefault(name, dim)
            if self.hnsw:
                for name, dim in self.spaces.items():
                    self._ensure_ann(conn, name, dim)
            self._read_ann_spaces(conn)

    # -- writes ---------------------------------------------------------------------------

    def write(self, docs: Sequence[PreparedDoc], conn: psycopg.Connection | None = None) -> None:
        """Upsert prepared rows in one transaction (or inside the caller's, given `conn`).

        Rows marked `unchanged` are skipped. A space listed in a row's `keep` keeps the
        vector stored for the same text (decided against the stored text hash, in SQL).
        """
        spaces = tuple(self.spaces)
        todo = [p for p in docs if not p.unchanged]
        if not todo:
            return
        q = self._write_sql(spaces)
        with self._writing(conn) as c:
            if len(todo) < COPY_THRESHOLD:
                rows = [self._row(p, spaces, None) for p in todo]
                with c.cursor() as cur:
                    if len(rows) == 1:
                        cur.execute(q.upsert, rows[0])
                    else:
                        cur.executemany(q.upsert, rows)
                return
            # Large batches: binary COPY into a session staging table, then one upsert.
            if self._staged_on.get(id(c)) is not c:
                c.execute(q.stage)
                self._staged_on[id(c)] = c
            with c.cursor().copy(q.copy) as copy:
                copy.set_types(q.types)
                for p in todo:  # no term list: the staged upsert takes the terms from tf's keys
                    copy.write_row(self._row(p, spaces, None, terms=False))
            c.execute(q.upsert_staged)
            c.execute(q.truncate_stage)

    def write_statements(self, docs: Sequence[PreparedDoc]) -> list[tuple[bytes, list[Any]]]:
        """`write`'s effect as (query, params) for a caller that sends a whole transaction
        as one query with the parameters bound on the client: one multi-row upsert whose
        vectors are text literals (exact: nine significant digits identify a float32).
        Meant for a few rows; `write` is cheaper for many."""
        spaces = tuple(self.spaces)
        params: list[Any] = []
        n = 0
        for p in docs:
            if not p.unchanged:
                params += self._row(p, spaces, vector_text)
                n += 1
        if not n:
            return []
        q = self._write_sql(spaces)
        return [(q.upsert_head + b", ".join([q.text_row] * n) + q.upsert_tail, params)]

    def _row(self, p: PreparedDoc, spaces: tuple[str, ...], as_text, terms: bool = True) -> tuple:
        d = p.doc
        vectors = []
        for sp in spaces:
            v = p.vectors.get(sp)
            if v is not None:
                v = check_vector(sp, self.spaces, v)
                if as_text is not None:
                    v = as_text(v)
            vectors.append(v)
        head = (d.object_type, d.object_id, d.node_kind, d.partition, d.title, d.body,
                Jsonb(list(d.keywords)), Jsonb(d.payload), Jsonb(d.attrs), d.source_updated_at,
                Jsonb(p.lexical.tf))
        tail = (p.lexical.len_title, p.lexical.len_body, list(p.pending), p.fingerprint,
                Jsonb(dict(p.hashes)), p.error, *vectors)
        return head + (p.lexical.terms,) + tail if terms else head + tail

    def _write_sql(self, spaces: tuple[str, ...]) -> WriteSQL:
        """`write`'s statements for these spaces, composed once."""
        cached = self._write_sql_cache.get(spaces)
        if cached is None:
            cached = self._write_sql_cache[spaces] = write_sql(self.schema, self.spaces, spaces)
        return cached

    def _tombstone_set(self) -> sql.Composed:
        """The SET list that strips a row to a tombstone: key and partition stay."""
        nulls = sql.SQL("").join(
            sql.SQL(", {c} = NULL").format(c=sql.Identifier(f"emb_{s}")) for s in self.spaces)
        return sql.SQL(
            "deleted = true, title = '', body = '', keywords = '[]', payload = '{{}}', "
            "attrs = '{{}}', tf = '{{}}', tsv = '', len_title = 0, len_body = 0, "
            "pending_spaces = '{{}}', doc_hash = NULL, embed_hashes = '{{}}', pending_error = NULL, "
            "updated_at = now(){nulls}").format(nulls=nulls)

    def delete(self, object_type: str, object_id: str, node_kind: str | None = None,
               conn: psycopg.Connection | None = None) -> int:
        """Tombstone an object's rows (or one node kind); returns how many."""
        stmt = sql.SQL(
            "UPDATE {s}.docs SET {tomb} WHERE object_type = %s AND object_id = %s AND NOT deleted"
            + (" AND node_kind = %s" if node_kind is not None else "")
        ).format(s=self._s, tomb=self._tombstone_set())
        params = [object_type, object_id] + ([node_kind] if node_kind is not None else [])
        with self._writing(conn) as c:
            return c.execute(stmt, params).rowcount

    def tombstone_many(self, keys: Sequence[DocKey], conn: psycopg.Connection | None = None) -> int:
        """Tombstone the given rows (exact keys) in one statement; returns how many changed."""
        if not keys:
            return 0
        ((query, params),) = self.tombstone_statements(keys)
        with self._writing(conn) as c:
            return c.execute(query, params).rowcount

    def tombstone_statements(self, keys: Sequence[DocKey]) -> list[tuple[bytes, list[Any]]]:
        """`tombstone_many`'s statement as (query, params); none for no keys."""
        if not keys:
            return []
        spaces = tuple(self.spaces)
        if self._tombstone_sql is None or self._tombstone_sql[0] != spaces:
            self._tombstone_sql = (spaces, sql.SQL(
                "UPDATE {s}.docs AS d SET {tomb} "
                "FROM unnest(%s::text[], %s::text[], %s::text[]) AS k(t, i, n) "
                "WHERE d.object_type = k.t AND d.object_id = k.i AND d.node_kind = k.n "
                "AND NOT d.deleted").format(s=self._s, tomb=self._tombstone_set()).as_bytes(None))
        cols = list(zip(*keys))
        return [(self._tombstone_sql[1], [list(cols[0]), list(cols[1]), list(cols[2])])]

    def set_vectors(self, space: str, rows: Sequence[tuple[DocKey, Any]],
                    conn: psycopg.Connection | None = None,
                    hashes: Sequence[str | None] | None = None) -> int:
        """Fill one space's vectors for existing rows and clear that space's pending mark.

        With `hashes` (the hash of the text each vector embeds, by position), a row is
        filled only if its stored text hash is still that one (a newer write wins), and
        the hash is recorded. Returns how many rows were filled.
        """
        checked = [(key, check_vector(space, self.spaces, v)) for key, v in rows]
        hs = list(hashes) if hashes is not None else [None] * len(checked)
        stmt = sql.SQL(
            "UPDATE {s}.docs SET {col} = %s, pending_spaces = array_remove(pending_spaces, %s), "
            "pending_error = CASE WHEN cardinality(array_remove(pending_spaces, %s)) = 0 THEN NULL "
            "ELSE pending_error END, "
            "embed_hashes = CASE WHEN %s::text IS NULL THEN embed_hashes "
            "ELSE embed_hashes || jsonb_build_object(%s::text, %s::text) END, updated_at = now() "
            "WHERE object_type = %s AND object_id = %s AND node_kind = %s AND NOT deleted "
            "AND (%s::text IS NULL OR coalesce(embed_hashes ->> %s, %s) = %s)"
        ).format(s=self._s, col=sql.Identifier(f"emb_{space}"))
        params = [(v if np.any(v) else None, space, space, h, space, h, *key, h, space, h, h)
                  for (key, v), h in zip(checked, hs)]
        with self._writing(conn) as c, c.cursor() as cur:
            cur.executemany(stmt, params, returning=False)
            return cur.rowcount if len(params) == 1 else len(params)

    # -- reads ----------------------------------------------------------------------------

    @staticmethod
    def _scope(scope: Scope) -> tuple[sql.Composable, list[Any]]:
        if scope.partitions is None:
            return sql.SQL("true"), []
        return sql.SQL("partition = ANY(%s)"), [list(scope.partitions)]

    @staticmethod
    def _filters(filters: Filters) -> tuple[sql.Composable, list[Any]]:
        parts: list[sql.Composable] = []
        params: list[Any] = []
        if filters.object_types is not None:
            parts.append(sql.SQL("object_type = ANY(%s)"))
            params.append(list(filters.object_types))
        if filters.node_kinds is not None:
            parts.append(sql.SQL("node_kind = ANY(%s)"))
            params.append(list(filters.node_kinds))
        if filters.attrs:
            parts.append(sql.SQL("attrs @> %s"))
            params.append(Jsonb(dict(filters.attrs)))
        return (sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")), params

    def retrieve(self, terms: Sequence[str], space: str | None, query: np.ndarray | None,
                 scope: Scope, filters: Filters, depth: int) -> Retrieved:
        """Scope statistics, the lexical top `depth` and the semantic candidates, in one round
        trip (a pipeline); a scope above `exact_limit` takes a second one, through HNSW."""
        q = check_vector(space, self.spaces, query) if query is not None and space else None
        cached = self._retrieve_cached(terms, space, q, scope, filters, depth)
        if cached is not None:
            return cached
        where, sparams = self._scope(scope)
        fsql, fparams = self._filters(filters)
        stats_q = sql.SQL(
            "SELECT count(*), coalesce(sum(len_title), 0), coalesce(sum(len_body), 0) "
            "FROM {s}.docs WHERE {where} AND NOT deleted").format(s=self._s, where=where)
        with self.connection() as c:
            # One snapshot for the statistics and both channels, in one round trip.
            with c.pipeline():
                c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                cur_stats = c.execute(stats_q, sparams)
                cur_lex = c.cursor(binary=True).execute(
                    *self._lexical_query(terms, where, sparams, fsql, fparams)) if terms else None
                cur_sem = c.cursor(binary=True).execute(
                    *self._exact_query(space, q, where, sparams, fsql, fparams, depth, guard=True)
                ) if q is not None else None
                c.execute("COMMIT")
            n, lt, lb = cur_stats.fetchone()
            stats = ScopeStats(int(n), int(lt), int(lb))
            lexical = []
            if cur_lex is not None:
                lexical = _rank_lexical(cur_lex.fetchall(), len(terms), stats, depth)
            keys: list[DocKey] = []
            matrix = np.zeros((0, self.spaces[space] if space else 0), np.float32)
            approximate = False
            if q is not None:
                rows = cur_sem.fetchall()  # empty when the scope is above the exact limit
                if stats.n_docs > self.exact_limit:
                    rows = self._hnsw(c, space, q, where, sparams, fsql, fparams, depth)
                    approximate = True
                    if len(rows) < depth:  # filtered HNSW came back short: exact after all
                        rows, approximate = c.cursor(binary=True).execute(*self._exact_query(
                            space, q, where, sparams, fsql, fparams, depth, guard=False)).fetchall(), False
                keys, matrix, approximate = _unpack(rows, self.spaces[space], approximate=approximate)
        return Retrieved(stats, lexical, keys, matrix, approximate)

    def _lexical_query(self, terms, where, sparams, fsql, fparams) -> tuple[sql.Composed, list]:
        # Each term's (title, body) counts as two integers, so nothing is parsed as JSON here.
        # The lateral subquery (kept apart by OFFSET 0) reads each term's pair once per row:
        # every access to the compressed term counts decompresses them again.
        pairs = sql.SQL(", ").join(sql.SQL("tf -> %s AS {}").format(sql.Identifier(f"t{i}"))
                                   for i in range(len(terms)))
        tf_cols = sql.SQL(", ").join(
            sql.SQL("coalesce(({j} ->> 0)::int, 0), coalesce(({j} ->> 1)::int, 0)").format(
                j=sql.Identifier("x", f"t{i}")) for i in range(len(terms)))
        # Scoped to partitions, the partition index narrows to a few thousand rows and the
        # match is best checked row by row, on the term counts the query reads anyway (their
        # keys are the tsvector's lexemes): the tsvector is often stored out of line, which
        # costs a TOAST lookup per row, and the GIN bitmap of every row in the table that
        # holds a common term is no use here.
        match = sql.SQL("tsv @@ %s::tsquery" if not sparams else "tf ?| %s::text[]")
        stmt = sql.SQL(
            "SELECT object_type, object_id, node_kind, len_title, len_body, ({f}), {tf} "
            "FROM {s}.docs, LATERAL (SELECT {pairs} OFFSET 0) AS x "
            "WHERE {where} AND NOT deleted AND {match}"
        ).format(s=self._s, f=fsql, tf=tf_cols, pairs=pairs, where=where, match=match)
        matcher = list(terms) if sparams else tsquery_any(terms)
        return stmt, [*fparams, *terms, *sparams, matcher]

    def _exact_query(self, space, q, where, sparams, fsql, fparams, depth, *,
                     guard: bool) -> tuple[sql.Composed, list]:
        """Candidates within CANDIDATE_MARGIN of the depth-th distance; scored exactly later.

        With `guard`, nothing is read when the scope is above `exact_limit` (HNSW answers)."""
        col = sql.Identifier(f"emb_{space}")
        limit = sql.SQL("")
        limit_params: list[Any] = []
        if guard:
            limit = sql.SQL(" AND (SELECT count(*) FROM {s}.docs WHERE {where} AND NOT deleted) <= %s"
                            ).format(s=self._s, where=where)
            limit_params = [*sparams, self.exact_limit]
        stmt = sql.SQL(
            "WITH c AS MATERIALIZED ("
            " SELECT object_type, object_id, node_kind, {col} AS v, ({col} <=> %s::vector) + 0 AS d"
            " FROM {s}.docs WHERE {where} AND NOT deleted AND {f} AND {col} IS NOT NULL{limit}) "
            "SELECT object_type, object_id, node_kind, v FROM c WHERE d <= coalesce("
            " (SELECT d FROM c ORDER BY d LIMIT 1 OFFSET %s), 'Infinity'::float8) + %s"
        ).format(s=self._s, col=col, where=where, f=fsql, limit=limit)
        return stmt, [q, *sparams, *fparams, *limit_params, depth - 1, CANDIDATE_MARGIN]

    def _hnsw(self, c, space, q, where, sparams, fsql, fparams, depth) -> list[tuple]:
        col = sql.Identifier(f"emb_{space}")
        with c.transaction():
            c.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(
                sql.Literal(int(min(1000, max(self.ef_search, depth))))))
            c.execute("SET LOCAL hnsw.iterative_scan = "
                      + ("relaxed_order" if self.iterative_scan else "off"))
            if space in self.ann_spaces:
                return self._ann_candidates(c, space, q, sparams, fsql, fparams, depth)
            return c.execute(sql.SQL(
                "SELECT object_type, object_id, node_kind, {col} FROM {s}.docs "
                "WHERE {where} AND NOT deleted AND {f} AND {col} IS NOT NULL "
                "ORDER BY {col} <=> %s::vector LIMIT %s"
            ).format(s=self._s, col=col, where=where, f=fsql),
                [*sparams, *fparams, q, depth], binary=True).fetchall()

    def fetch(self, keys: Sequence[DocKey]) -> dict[DocKey, dict[str, Any]]:
        if not keys:
            return {}
        cols = list(zip(*keys))
        stmt = sql.SQL(
            "SELECT object_type, object_id, node_kind, partition, title, payload, attrs FROM {s}.docs "
            "WHERE (object_type, object_id, node_kind) IN "
            "(SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]))").format(s=self._s)
        with self.connection() as c:
            rows = c.execute(stmt, [list(cols[0]), list(cols[1]), list(cols[2])]).fetchall()
        return {(r[0], r[1], r[2]): {"partition": r[3], "title": r[4], "payload": r[5], "attrs": r[6]}
                for r in rows}

    # -- operator views (status command, metrics) -----------------------------------------

    def counts_by_type(self, conn: psycopg.Connection | None = None) -> list[tuple[str, int, int]]:
        """(object_type, live rows, tombstones) per object type, in type order."""
        with self.connection(conn) as c:
            return [tuple(r) for r in c.execute(self._q(
                "SELECT object_type, count(*) FILTER (WHERE NOT deleted), "
                "count(*) FILTER (WHERE deleted) FROM {s}.docs GROUP BY 1 ORDER BY 1"))]

    def pending_counts(self, conn: psycopg.Connection | None = None) -> dict[str, int]:
        """Live rows still waiting for a vector, per embedding space."""
        with self.connection(conn) as c:
            return dict(c.execute(self._q(
                "SELECT space, count(*) FROM {s}.docs, unnest(pending_spaces) AS space "
                "WHERE NOT deleted GROUP BY 1")).fetchall())

    def get(self, object_type: str, object_id: str, node_kind: str = "leaf") -> dict[str, Any] | None:
        """One stored row (tombstones included) as a dict, vectors under `vectors`."""
        with self.connection() as c:
            cur = c.execute(self._q(
                "SELECT * FROM {s}.docs WHERE object_type = %s AND object_id = %s AND node_kind = %s"),
                (object_type, object_id, node_kind))
            row = cur.fetchone()
            if row is None:
                return None
            out = dict(zip([d.name for d in cur.description], row))
        out["vectors"] = {s: out.pop(f"emb_{s}") for s in self.spaces if f"emb_{s}" in out}
        out["vectors"] = {s: _as_array(v) for s, v in out["vectors"].items()
                          if v is not None}
        return out


def _configure(conn: psycopg.Connection) -> None:
    from pgvector.psycopg import register_vector

    register_vector(conn)


def _configure_pooled(conn: psycopg.Connection) -> None:
    """Pooled connections read in autocommit (no transaction left to roll back on return);
    writes open their own transactions."""
    _configure(conn)
    conn.autocommit = True


def _rank_lexical(rows: list[tuple], n_terms: int, stats: ScopeStats, depth: int) -> list:
    """The lexical top `depth` from the candidate rows, as `ranking.bm25_rank` ranks them."""
    if not rows:
        return []
    cols = list(zip(*rows))
    keys = list(zip(cols[0], cols[1], cols[2]))
    tfs = np.array(cols[6:], np.int64).T.reshape(len(rows), n_terms, 2)
    return rank_candidates(stats, keys, np.array(cols[3], np.int64), np.array(cols[4], np.int64),
                           tfs, np.array(cols[5], bool), depth)


def _unpack(rows: list[tuple], dim: int, *, approximate: bool) -> tuple[list[DocKey], np.ndarray, bool]:
    keys = [(r[0], r[1], r[2]) for r in rows]
    if not rows:
        return keys, np.zeros((0, dim), np.float32), approximate
    return keys, np.stack([_as_array(r[3]) for r in rows]), approximate


def _as_array(value: Any) -> np.ndarray:
    """pgvector's loader gives a `Vector` (newer releases) or an ndarray; we want float32."""
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    return np.asarray(value, dtype=np.float32)
