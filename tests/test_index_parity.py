"""Guarantee 5: the server and a device shard return the same ordered results for the same rows.

Random corpora over several partitions go through random inserts, updates (moves
between partitions included) and deletes on Postgres; a SQLite shard holds one
partition, built from the same documents. Random queries, with and without filters,
must give identical keys, match types, channel ranks and collapsed node kinds, and
scores equal within 1e-6.
"""

from __future__ import annotations

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from slipstream.index import HashingEmbedder, IndexDoc, PostgresBackend, SearchIndex, SQLiteBackend

DIM = 32
VOCAB = ["apple", "banana", "cherry", "grocery", "groceries", "shopping", "list", "meeting", "notes", "quantum", "entangle", "entanglement", "plan", "quarterly", "report", "invoice", "refund", "customer", "travel", "paris", "flight", "the", "of"]
PARTITIONS = ("p1", "p2", "p3")
SHARD_PARTITION = "p1"

words = st.lists(st.sampled_from(VOCAB), max_size=10).map(" ".join)
odd_text = st.text(alphabet=st.characters(categories=["L", "N", "Zs"]), max_size=12)
texts = st.one_of(words, words, words, odd_text)
attrs = st.fixed_dictionaries({}, optional={
    "color": st.sampled_from(["red", "blue", "green"]),
    "n": st.integers(0, 2),
    "flag": st.booleans(),
})


@st.composite
def docs(draw) -> IndexDoc:
    return IndexDoc(
        object_type=draw(st.sampled_from(["note", "task"])),
        object_id=str(draw(st.integers(0, 12))),
        node_kind=draw(st.sampled_from(["leaf", "leaf", "summary", "chunk"])),
        title=draw(texts),
        body=draw(texts),
        keywords=draw(st.lists(st.sampled_from(VOCAB), max_size=2)),
        partition=draw(st.sampled_from(PARTITIONS)),
        attrs=draw(attrs),
        payload={"n": draw(st.integers(0, 5))},
    )


ops = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"), st.lists(docs(), min_size=1, max_size=6)),
        st.tuples(st.just("delete"), st.tuples(st.sampled_from(["note", "task"]),
                                               st.integers(0, 12).map(str))),
    ),
    min_size=1, max_size=12,
)

queries = st.fixed_dictionaries(
    {"query": st.lists(st.sampled_from(VOCAB), min_size=1, max_size=3).map(" ".join)},
    optional={
        "k": st.integers(1, 8),
        "object_types": st.lists(st.sampled_from(["note", "task"]), min_size=1, max_size=2),
        "node_kinds": st.lists(st.sampled_from(["leaf", "summary", "chunk"]), min_size=1, max_size=2),
        "attrs": st.fixed_dictionaries({}, optional={
            "color": st.sampled_from(["red", "blue"]), "n": st.integers(0, 2), "flag": st.booleans()}),
        "mode": st.sampled_from(["balanced", "precision", "explore"]),
        "collapse": st.booleans(),
        "min_semantic_score": st.sampled_from([0.1, 0.3]),
        "diversity_key": st.sampled_from(["object_type", "color"]),
    },
)


def _dedupe(batch: list[IndexDoc]) -> list[IndexDoc]:
    last = {d.key: d for d in batch}
    return list(last.values())


def summary(results) -> list[tuple]:
    return [(r.key, r.match_type, r.lexical_rank, r.semantic_rank, r.matched_node_kinds,
             r.partition, r.payload, r.attrs) for r in results]


@pytest.fixture
def server(pg_dsn: str):
    backend = PostgresBackend(pg_dsn, spaces={"local": DIM})
    yield SearchIndex(backend, HashingEmbedder(DIM)), pg_dsn
    backend.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=ops, query_list=st.lists(queries, min_size=1, max_size=4))
def test_server_and_shard_rank_identically(server, history, query_list) -> None:
    index, dsn = server
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE slipstream.docs")
    shard = SearchIndex(SQLiteBackend(spaces={"local": DIM}), HashingEmbedder(DIM))
    in_shard: set[tuple] = set()
    for op, arg in history:
        if op == "upsert":
            batch = _dedupe(arg)
            index.upsert_many(batch)
            mine = [d for d in batch if d.partition == SHARD_PARTITION]
            shard.upsert_many(mine)
            in_shard |= {d.key for d in mine}
            for d in batch:  # moved out of the shard's partition: the device sees a delete
                if d.partition != SHARD_PARTITION and d.key in in_shard:
                    shard.delete(*d.key)
                    in_shard.discard(d.key)
        else:
            index.delete(*arg)
            shard.delete(*arg)
            in_shard -= {key for key in in_shard if key[:2] == arg}

    for q in query_list:
        q = dict(q)
        if "diversity_key" in q:
            q["diversity_cap"] = 1
        text = q.pop("query")
        on_server = index.search(text, partition=SHARD_PARTITION, **q)
        on_device = shard.search(text, partition=SHARD_PARTITION, **q)
        assert summary(on_server) == summary(on_device), (text, q)
        for a, b in zip(on_server, on_device):
            assert a.score == pytest.approx(b.score, abs=1e-6)
            for x, y in ((a.lexical_score, b.lexical_score), (a.semantic_score, b.semantic_score)):
                assert (x is None) == (y is None)
                if x is not None:
                    assert x == pytest.approx(y, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(history=ops, query_list=st.lists(queries, min_size=1, max_size=4))
def test_shard_cache_ranks_exactly_as_the_plain_sql_reader(history, query_list) -> None:
    """The vectorised BM25 over in-memory postings equals the reference scorer over FTS5 rows."""
    from slipstream.index.analysis import query_terms
    from slipstream.index.backend import Filters, Scope
    from slipstream.index.ranking import bm25_rank

    backend = SQLiteBackend(spaces={"local": DIM})
    shard = SearchIndex(backend, HashingEmbedder(DIM))
    for op, arg in history:
        if op == "upsert":
            shard.upsert_many(_dedupe(arg))
        else:
            shard.delete(*arg)
    for q in query_list:
        terms = query_terms(q["query"])
        for scope in (Scope(None), Scope((SHARD_PARTITION,)), Scope(("p2", "p3"))):
            filters = Filters.of(q.get("object_types"), q.get("node_kinds"), q.get("attrs"))
            stats = backend.scope_stats(scope)
            reference = bm25_rank(terms, stats, backend.lexical_candidates(terms, scope, filters))
            assert backend.lexical_rank(terms, scope, filters, stats, 10_000) == reference
