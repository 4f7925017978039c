"""The server's scope cache never answers from rows that changed, whichever writer changed them.

A searcher with the cache and one without read the same database; after every write
— the worker's stream apply, a backfill copy, a dead-letter retry, the fill pass, the
re-embed switch, compaction's tombstone purge, an unlogged write through the backend
itself — both give the same results, the write visibly changed them, and the cache
did serve the unchanged queries (so the comparison is not vacuous).
"""

from __future__ import annotations

import random

import numpy as np
import psycopg
import pytest
from slipstream.index import HashingEmbedder, IndexDoc, PostgresBackend, SearchIndex
from slipstream.index.errors import ConfigurationError
from slipstream.index.scope_cache import ScopeCache
from slipstream.shardsync.changelog import ChangeLog
from slipstream.shardsync.compact import compact
from slipstream.shardsync.export import export_shard
from slipstream.shardsync.shard import open_shard
from slipstream.worker.incoming import Batch, SourceChange, row_key
from slipstream.worker.lsn import parse_lsn
from slipstream.worker.reembed import reembed_space
from slipstream.worker.snapshot import copy_steps, read_row, table_shape

from .shardsync_helpers import LogWriter, assert_same_search, doc, random_doc, summary
from .worker_harness import DIM, NOTES_DDL, Harness

QUERIES = ["apple report", "paris flight", "banana", "invoice refund quarterly"]


class Searchers:
    """The same database searched with and without the cache."""

    def __init__(self, dsn: str, dim: int = DIM, max_bytes: int = 64 * 2**20,
                 background: bool = False) -> None:
        self.cache = ScopeCache(ChangeLog("slipstream"), max_bytes=max_bytes, background=background)
        self.cached_backend = PostgresBackend(dsn, spaces={"local": dim}, hnsw=False,
                                              scope_cache=self.cache)
        self.plain_backend = PostgresBackend(dsn, spaces={"local": dim}, hnsw=False)
        embedder = HashingEmbedder(dim)
        self.cached = SearchIndex(self.cached_backend, {"local": embedder}, default_space="local",
                                  check_embedders=False)
        self.plain = SearchIndex(self.plain_backend, {"local": embedder}, default_space="local",
                                 check_embedders=False)

    def same(self, partition: str, queries=QUERIES, **kw) -> list[list[tuple]]:
        """Search both ways; assert equal results; return them."""
        out = []
        for q in queries:
            a = summary(self.cached.search(q, partition=partition, k=10, **kw))
            b = summary(self.plain.search(q, partition=partition, k=10, **kw))
            assert a == b, (q, partition)
            out.append(a)
        return out

    def served(self, partition: str) -> list[list[tuple]]:
        """`same`, and the cache answered every query of the second round from memory."""
        first = self.same(partition)
        hits, misses = self.cache.stats.hits, self.cache.stats.misses
        again = self.same(partition)
        assert again == first
        assert (self.cache.stats.hits - hits, self.cache.stats.misses - misses) == (len(QUERIES), 0)
        return first

    def close(self) -> None:
        self.cached_backend.close()
        self.plain_backend.close()


def ids(results: list[list[tuple]]) -> set[str]:
    return {row[0][1] for per_query in results for row in per_query}


def notes(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(NOTES_DDL)
        conn.execute("INSERT INTO notes (owner, title, body) SELECT (ARRAY['alice','bob'])[1 + i % 2], "
                     "'apple report ' || i, 'paris flight ' || i FROM generate_series(1, 20) i")


@pytest.fixture
def harness(pg_dsn: str):
    notes(pg_dsn)
    h = Harness(pg_dsn)
    h.setup()  # the initial copy, through the apply transaction
    yield h
    h.close()


def source(dsn: str, stmt: str, params=()) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(stmt, params)


def test_the_worker_stream_apply_invalidates(pg_dsn: str, harness: Harness) -> None:
    s = Searchers(pg_dsn)
    try:
        harness.start()
        harness.wait_caught_up()
        before = s.served("alice")
        source(pg_dsn, "INSERT INTO notes (owner, title, body) VALUES ('alice', 'banana invoice', 'x')")
        harness.wait_caught_up()
        assert "21" in ids(s.served("alice")) - ids(before)  # an insert
        source(pg_dsn, "UPDATE notes SET title = 'banana split' WHERE id = 4")
        harness.wait_caught_up()
        after = s.served("alice")
        assert any(r[0][1] == "4" for r in after[QUERIES.index("banana")])  # an update
        s.served("bob")
        source(pg_dsn, "UPDATE notes SET owner = 'bob' WHERE id = 4")  # a move
        harness.wait_caught_up()
        assert "4" not in ids(s.served("alice")) and "4" in ids(s.served("bob"))
        source(pg_dsn, "DELETE FROM notes WHERE id = 21")
        harness.wait_caught_up()
        assert "21" not in ids(s.served("alice"))
    finally:
        s.close()


def test_a_backfill_copy_and_a_dead_letter_retry_invalidate(pg_dsn: str, harness: Harness) -> None:
    """Both apply copied rows through the apply transaction (`Batch(snapshot=True)`)."""
    s = Searchers(pg_dsn)
    applier = harness.applier()
    try:
        source(pg_dsn, "CREATE TABLE public.more (LIKE public.notes INCLUDING ALL)")
        source(pg_dsn, "INSERT INTO more (id, owner, title, body) VALUES (500, 'alice', 'banana backfill', 'b')")
        harness.mappers["public.more"] = lambda row, op: [IndexDoc(
            "more", str(row["id"]), title=str(row["title"]), partition=str(row["owner"]))]
        before = s.served("alice")
        with psycopg.connect(pg_dsn, autocommit=True) as src:
            for _ in copy_steps(applier, src, table_shape(src, "public.more"), chunk_rows=10):
                pass
        assert "500" in ids(s.served("alice")) - ids(before)

        source(pg_dsn, "UPDATE more SET title = 'quarterly invoice' WHERE id = 500")  # as a retry re-reads it
        with psycopg.connect(pg_dsn, autocommit=True) as src:
            shape = table_shape(src, "public.more")
            values = read_row(src, shape, ["500"])
            (lsn,) = src.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        batch = Batch(snapshot=True)
        batch.changes.append(SourceChange(kind="snapshot", relation="public.more", commit_lsn=parse_lsn(lsn),
                                          key=row_key(values, shape.key), values=dict(values),
                                          columns=shape.type_oids))
        applier.apply(batch)
        after = s.served("alice")
        assert ("more", "500", "leaf") in {r[0] for r in after[QUERIES.index("invoice refund quarterly")]}
        assert ("more", "500", "leaf") not in {r[0] for r in after[QUERIES.index("banana")]}
    finally:
        applier.close()
        s.close()


class Toggle:
    """HashingEmbedder that can be down (rows stay pending) or shifted (another model)."""

    dim = DIM

    def __init__(self, model: str = "a") -> None:
        self.down, self.model = False, model
        self.embedder_id = HashingEmbedder(DIM).embedder_id if model == "a" else f"test:shifted:{DIM}"

    def embed(self, texts):
        if self.down:
            raise RuntimeError("embedding service down")
        out = HashingEmbedder(DIM).embed(texts)
        return out if self.model == "a" else np.roll(out, 5, axis=1)


def test_the_fill_pass_invalidates(pg_dsn: str) -> None:
    notes(pg_dsn)
    embedder = Toggle()
    embedder.down = True
    harness = Harness(pg_dsn, embedder=embedder)
    harness.setup()  # every row copied lexical-only, pending
    s = Searchers(pg_dsn)
    applier = harness.applier()
    try:
        before = s.served("alice")
        assert all(r[3] is None for per in before for r in per)  # no semantic rank
        embedder.down = False
        assert applier.fill_pending() == 20
        after = s.served("alice")
        assert any(r[3] is not None for per in after for r in per)  # semantic ranks now
    finally:
        applier.close()
        harness.close()
        s.close()


def test_the_reembed_switch_invalidates(pg_dsn: str, harness: Harness) -> None:
    s = Searchers(pg_dsn)
    try:
        harness.start()
        harness.wait_caught_up()
        harness.stop()  # the switch takes the apply writer
        before = s.served("alice")
        new = SearchIndex(harness.backend, Toggle("b"), check_embedders=False)
        last = reembed_space(harness.backend, new, harness.state, "slipstream", "local", batch=8)
        assert last.phase == "switched"
        after = s.served("alice")
        assert [[r[10] for r in per] for per in after] != [[r[10] for r in per] for per in before]
    finally:
        s.close()


def test_compaction_lowering_a_partitions_last_seq_cannot_revive_an_entry(pg_dsn: str) -> None:
    """W's entry is the partition's last when the entry is built; X is deleted, and the purge
    removes both of X's entries, so the partition's last seq is W's again. The horizon in
    the version is what tells the cached X apart."""
    writer = LogWriter(pg_dsn, spaces={"local": DIM})
    s = Searchers(pg_dsn)
    log = ChangeLog("slipstream")
    try:
        writer.apply([doc("x", "A", "banana")])
        built_at = writer.apply([doc("w", "A", "apple report")])
        assert "x" in ids(s.served("A"))
        writer.apply(deletes=[("note", "x", "leaf")])
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            report = compact(conn, retention=0)
            assert report.tombstones == 1 and report.docs_purged == 1
            _, horizon, (last,) = log.partition_versions(conn, ["A"])
        assert last == built_at  # the seq alone would call the old entry current
        assert horizon > built_at
        assert "x" not in ids(s.served("A"))
    finally:
        writer.close()
        s.close()


def test_unlogged_writes_through_the_backend_are_never_served_stale(pg_dsn: str) -> None:
    """`SearchIndex.upsert` logs nothing: the write voids the process's entries, and rows
    with no change-log entry at all are not cached."""
    s = Searchers(pg_dsn)
    try:
        with pytest.raises(ConfigurationError, match="change log"):  # no log in this schema yet
            s.cached.search("banana", partition="A")
        writer = LogWriter(pg_dsn, spaces={"local": DIM})
        s.cached.upsert_many([doc(str(i), "A", "banana") for i in range(4)])
        s.same("A")
        assert len(s.cache) == 0 and s.cache.stats.uncacheable > 0
        writer.apply([doc("logged", "B", "banana")])
        writer.close()
        s.served("B")
        s.cached.upsert_many([doc("direct", "B", "banana apple")])  # through the cached backend
        assert "direct" in ids(s.same("B"))
    finally:
        s.close()


def test_memory_is_bounded_and_least_recently_used_goes_first(pg_dsn: str) -> None:
    writer = LogWriter(pg_dsn, spaces={"local": DIM})
    for p in "ABC":
        writer.apply([doc(f"{p}{i}", p, "apple banana report", body="paris flight " * (i % 5))
                      for i in range(60)])
    writer.close()
    probe = Searchers(pg_dsn)
    probe.same("A")
    one = probe.cache.nbytes
    probe.close()
    s = Searchers(pg_dsn, max_bytes=int(one * 2.5))
    try:
        for p in "ABCA":
            s.same(p)
            assert s.cache.nbytes <= s.cache.max_bytes
        assert len(s.cache) == 2 and s.cache.stats.evictions == 2  # A went for C, then B for A
        tiny = Searchers(pg_dsn, max_bytes=one // 2)
        tiny.same("A")  # too large for the budget: answered uncached, nothing kept
        assert len(tiny.cache) == 0 and tiny.cache.nbytes == 0
        tiny.close()
    finally:
        s.close()


def test_the_cache_needs_the_change_log() -> None:
    with pytest.raises(ConfigurationError, match="ChangeLog"):
        ScopeCache(object())
    with pytest.raises(ConfigurationError, match="max_bytes"):
        ScopeCache(ChangeLog("slipstream"), max_bytes=0)


def test_answers_from_the_cache_rank_as_the_device_does(pg_dsn: str, tmp_path) -> None:
    """Filters, modes, collapse, several partitions: the cached server, the uncached
    server and a device shard agree bit for bit, and the cache answered."""
    rng = random.Random(5)
    writer = LogWriter(pg_dsn)
    for start in range(0, 300, 60):
        writer.apply([random_doc(rng, str(i), ["A", "B"]) for i in range(start, start + 60)])
    writer.apply(deletes=[(t, str(i), n) for i in range(0, 300, 7) for t in ("note", "task")
                          for n in ("leaf", "chunk")])
    writer.close()
    s = Searchers(pg_dsn, dim=16)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        export_shard(conn, "slipstream", ["A", "B"], tmp_path / "ab.db", ["local"])
    shard = open_shard(tmp_path / "ab.db")
    device = SearchIndex(shard, {"local": HashingEmbedder(16)}, default_space="local")
    try:
        for scope in ("A", ["A", "B"]):
            compared = assert_same_search(s.cached, device, scope)
            assert compared > 0
            assert assert_same_search(s.plain, device, scope) == compared
        assert s.cache.stats.hits > 0 and len(s.cache) == 2
    finally:
        shard.close()
        s.close()


def test_a_miss_is_answered_uncached_and_built_beside_it(pg_dsn: str) -> None:
    writer = LogWriter(pg_dsn, spaces={"local": DIM})
    writer.apply([doc(str(i), "A", "apple banana report") for i in range(30)])
    s = Searchers(pg_dsn, background=True)
    try:
        first = s.same("A", QUERIES[:1])  # a miss: read through the uncached path
        assert s.cache.stats.hits == 0
        s.cache.wait_built()
        assert len(s.cache) == 1
        assert s.same("A", QUERIES[:1]) == first and s.cache.stats.hits == 1
        writer.apply([doc("new", "A", "apple banana report apple")])
        changed = s.same("A", QUERIES[:1])  # stale now: uncached again, rebuilt beside
        assert changed != first and s.cache.stats.hits == 1
        s.cache.wait_built()
        assert s.same("A", QUERIES[:1]) == changed and s.cache.stats.hits == 2
    finally:
        writer.close()
        s.close()


def test_building_from_columns_gives_the_structures_of_row_by_row() -> None:
    """The server builds a scope with `of_arrays`; a device with `add`: same arrays."""
    from slipstream.index.shard_cache import ShardCache

    rng = np.random.default_rng(4)
    words = ["apple", "banana", "cherry", "report", "paris"]
    rows = []
    for i in range(0, 400, 3):  # ascending ids with gaps
        tf = {w: (int(rng.integers(0, 3)), int(rng.integers(0, 4))) for w in rng.choice(words, 3, replace=False)}
        vec = rng.standard_normal(8).astype(np.float32) if i % 5 else None
        rows.append((i, ("note" if i % 2 else "task", str(i), "leaf"), f"p{i % 3}",
                     sum(t for t, _ in tf.values()), sum(b for _, b in tf.values()), tf,
                     {} if vec is None else {"local": vec}))
    by_rows = ShardCache.of_rows({"local": 8}, rows)
    terms = sorted({t for r in rows for t in r[5]})
    number = {t: n for n, t in enumerate(terms)}
    post = [(r[0], number[t], a, b) for r in rows for t, (a, b) in r[5].items()]
    matrix = np.stack([r[6].get("local", np.zeros(8, np.float32)) for r in rows])
    by_cols = ShardCache.of_arrays({"local": 8}, [r[0] for r in rows], [r[1] for r in rows],
                                   [r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows],
                                   terms, tuple(list(c) for c in zip(*post)),
                                   {"local": (matrix, np.array(["local" in r[6] for r in rows]))})
    assert by_cols.keys == by_rows.keys
    for term in terms:
        got, want = by_cols.postings(term), by_rows.postings(term)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), term
    for name in ("partition", "object_type", "node_kind"):
        for value in ("p1", "note", "leaf"):
            if value in by_rows._codes[name]:
                assert np.array_equal(by_cols.label_mask(name, [value]), by_rows.label_mask(name, [value]))
    assert np.array_equal(by_cols.vectors["local"].view, by_rows.vectors["local"].view)
    assert np.array_equal(by_cols.has_vector["local"].view, by_rows.has_vector["local"].view)
    assert np.array_equal(by_cols.codes["local"].codes_t[:, :len(rows)], by_rows.codes["local"].codes_t[:, :len(rows)])
    assert np.array_equal(by_cols.len_title.view, by_rows.len_title.view)
    q = rng.standard_normal(8).astype(np.float32)
    ranked = []
    for cache in (by_cols, by_rows):
        view = cache.scope_view(("p0", "p1"))
        ranked.append((cache.lexical_top(view, None, ["apple", "paris"], 10)[0],
                       cache.semantic_top(view, None, "local", q, 10)[2].tolist()))
    assert ranked[0] == ranked[1] and ranked[0][0]


def test_a_schema_set_up_again_never_matches_an_old_entry(pg_dsn: str) -> None:
    """After DROP SCHEMA and a new set-up, seqs start over: the same (horizon, seq) as an
    old entry, other rows. The log table's identity in the version tells them apart."""
    writer = LogWriter(pg_dsn, spaces={"local": DIM})
    writer.apply([doc("old", "A", "banana")])
    writer.close()
    s = Searchers(pg_dsn)
    try:
        assert "old" in ids(s.served("A"))
        source(pg_dsn, "DROP SCHEMA slipstream CASCADE")
        writer = LogWriter(pg_dsn, spaces={"local": DIM})
        writer.apply([doc("new", "A", "banana")])
        writer.close()
        got = ids(s.same("A"))
        assert "new" in got and "old" not in got
    finally:
        s.close()
