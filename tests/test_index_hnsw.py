"""The server's approximate path: HNSW above the exact-scan limit, exact fallback when short."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from slipstream.index import IndexDoc, PostgresBackend, SearchIndex

DIM = 16
ROWS = 400


@pytest.fixture
def corpus(pg_dsn: str):
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    backend = PostgresBackend(pg_dsn, spaces={"local": DIM}, exact_limit=50, ef_search=10,
                              iterative_scan=False)
    index = SearchIndex(backend)
    docs = [IndexDoc("v", str(i), title=f"row {i}", partition="p",
                     attrs={"rare": i % 97 == 0}) for i in range(ROWS)]
    backend.write(index.prepare(docs, {i: {"local": vectors[i]} for i in range(ROWS)}))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("ANALYZE slipstream.docs")
    yield index, vectors, rng
    backend.close()


def exact_top(vectors: np.ndarray, q: np.ndarray, ids: list[int], k: int) -> list[str]:
    v = vectors[ids].astype(np.float64)
    cos = v @ q.astype(np.float64) / (np.linalg.norm(v, axis=1) * np.linalg.norm(q))
    order = sorted((i for i in range(len(ids)) if cos[i] > 0), key=lambda i: -cos[i])
    return [str(ids[i]) for i in order[:k]]


def test_large_scope_uses_hnsw_and_says_so(corpus) -> None:
    index, vectors, rng = corpus
    q = rng.normal(size=DIM).astype(np.float32)
    results = index.search("zz", partition="p", query_vector=q, k=5)
    assert results.approximate
    assert results.scope_size == ROWS
    assert len(results) == 5


def test_filtered_hnsw_that_comes_back_short_falls_back_to_exact(corpus) -> None:
    index, vectors, rng = corpus
    q = rng.normal(size=DIM).astype(np.float32)
    rare = [i for i in range(ROWS) if i % 97 == 0]
    results = index.search("zz", partition="p", query_vector=q, k=3, attrs={"rare": True})
    # ef_search=10 with iterative scan off cannot find 5 of 400 rows through a filter;
    # the exact fallback finds every qualifying row.
    assert not results.approximate
    assert [r.object_id for r in results] == exact_top(vectors, q, rare, 3)


def test_small_scope_is_exact(corpus) -> None:
    index, vectors, rng = corpus
    index.backend.exact_limit = 10_000
    q = rng.normal(size=DIM).astype(np.float32)
    results = index.search("zz", partition="p", query_vector=q, k=10)
    assert not results.approximate
    assert [r.object_id for r in results] == exact_top(vectors, q, list(range(ROWS)), 10)
