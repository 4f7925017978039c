"""The device's fast paths rank exactly as the plain computation does.

* BM25 top-`depth` with pruning (`scope_view`) against every row scored, on skewed
  postings with many ties, through hypothesis;
* a shard of 20,000 rows (large enough for the int8 first pass and the pruned BM25
  to do real work) against the server, query by query: identical keys, ranks and
  scores, bit for bit, for hashed (sparse) and dense query vectors, with filters.
"""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from slipstream.index import HashingEmbedder, IndexDoc, PostgresBackend, SearchIndex, SQLiteBackend
from slipstream.index.ranking import LexicalCandidate, ScopeStats, bm25_rank
from slipstream.index.scope_view import _dense, rank_candidates
from slipstream.index.shard_cache import CachedRow, ShardCache

TERMS = [f"t{i}" for i in range(12)]


def _ranked(cache: ShardCache, slots: np.ndarray, scores: np.ndarray, depth: int) -> list:
    rows = sorted(((cache.keys[i], float(v)) for i, v in zip(slots, scores)), key=lambda kv: (-kv[1], kv[0]))
    return rows[:depth]


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 3000), depth=st.sampled_from([1, 3, 10, 50]),
       query=st.lists(st.sampled_from(TERMS[:8]), min_size=1, max_size=4, unique=True),
       distinct_lengths=st.sampled_from([1, 2, 50]), deletes=st.booleans())
def test_pruned_bm25_top_depth_equals_scoring_every_row(seed, n, depth, query, distinct_lengths,
                                                        deletes) -> None:
    rng = np.random.default_rng(seed)
    share = np.array([0.97, 0.9, 0.6, 0.3, 0.1, 0.02, 0.005, 0.001, 0, 0, 0, 0])
    cache = ShardCache({}, 0)
    rows = []
    for i in range(n):
        has = rng.random(len(TERMS)) < share
        tf = {t: (int(rng.integers(0, 2)), int(rng.integers(1, 3))) for t, h in zip(TERMS, has) if h}
        length = int(rng.integers(0, distinct_lengths)) + 5  # few lengths: many exact ties
        rows.append(CachedRow(i, ("note", f"{i:05d}", "leaf"), "p" if i % 5 else "q", length, length,
                              tf, {}))
    cache.add(rows[: n // 2])
    cache.merge()
    cache.add(rows[n // 2:])  # half in the merged base, half in the delta
    if deletes:
        cache.remove(range(0, n, 7))
    for partitions in (None, ("p",)):
        view = cache.scope_view(partitions)
        terms = sorted(query)
        slots, scores = view.top_rows(terms, None, depth)
        every_slot, every_score = _dense([view.term(t) for t in terms], len(cache.keys))
        assert _ranked(cache, slots, scores, depth) == _ranked(cache, every_slot, every_score, depth)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 400), n_terms=st.integers(1, 4),
       depth=st.sampled_from([1, 5, 50]), n_docs_extra=st.integers(0, 1000))
def test_array_scoring_of_server_candidates_equals_bm25_rank(seed, n, n_terms, depth, n_docs_extra) -> None:
    """The server ranks its candidate rows as arrays; `bm25_rank` is the reference."""
    rng = np.random.default_rng(seed)
    tfs = rng.integers(0, 3, (n, n_terms, 2)) * (rng.random((n, n_terms, 1)) < 0.6)
    lens = rng.integers(0, 4, (n, 2)) + tfs.sum(axis=1)
    selected = rng.random(n) < 0.8
    keys = [("note", f"{int(i):04d}", "leaf") for i in rng.permutation(n)]
    stats = ScopeStats(n + n_docs_extra, int(lens[:, 0].sum()) + n_docs_extra,
                       int(lens[:, 1].sum()) + 3 * n_docs_extra)
    candidates = [LexicalCandidate(keys[i], int(lens[i, 0]), int(lens[i, 1]),
                                   tuple((int(t), int(b)) for t, b in tfs[i]), bool(selected[i]))
                  for i in range(n)]
    want = bm25_rank([f"t{i}" for i in range(n_terms)], stats, candidates)[:depth]
    assert rank_candidates(stats, keys, lens[:, 0], lens[:, 1], tfs, selected, depth) == want


def test_pruned_bm25_finds_tied_rows_beyond_the_seeds() -> None:
    """Two terms in every row, each strong in half of them, keys in reverse slot order: the
    rows that win the tie on key are none of either term's first rows, so only the
    one-summand-must-reach-floor/m bound brings them in."""
    n, depth = 400, 10
    cache = ShardCache({}, 0)
    cache.add(CachedRow(i, ("note", f"{n - i:05d}", "leaf"), "p", 5, 5,
                        {"a": (0, 2 if i % 2 == 0 else 1), "b": (0, 1 if i % 2 == 0 else 2)}, {})
              for i in range(n))
    view = cache.scope_view(None)
    slots, scores = view.top_rows(["a", "b"], None, depth)
    ranked = _ranked(cache, slots, scores, depth)
    assert [key[1] for key, _ in ranked] == [f"{i:05d}" for i in range(1, depth + 1)]
    assert ranked == _ranked(cache, *_dense([view.term("a"), view.term("b")], n), depth)


SHARD_ROWS = 20_000
DIM = 64


def _corpus(rng: np.random.Generator, n: int, start: int, partition: str) -> list[IndexDoc]:
    vocab = [f"w{i}x" for i in range(800)]
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    p /= p.sum()
    words = rng.choice(len(vocab), size=(n, 24), p=p)
    return [IndexDoc("note" if i % 3 else "task", str(start + i),
                     title=" ".join(vocab[w] for w in words[i, :4]),
                     body=" ".join(vocab[w] for w in words[i, 4:4 + int(rng.integers(4, 20))]),
                     partition=partition, attrs={"b": i % 4})
            for i in range(n)]


@pytest.mark.slow
def test_a_large_shard_ranks_exactly_as_the_server(pg_dsn: str, monkeypatch) -> None:
    from slipstream.index import scope_view, shard_cache

    pruned, kept = [], []
    real_pruned, real_first_pass = scope_view._pruned, shard_cache.first_pass

    def spy_pruned(*args):
        found = real_pruned(*args)
        pruned.append(found is not None)
        return found

    def spy_first_pass(codes, query, rows, depth, exact, floor=0.0):
        out = real_first_pass(codes, query, rows, depth, exact, floor)
        kept.append((out[0].size, codes.n if rows is None else rows.size))
        return out

    monkeypatch.setattr(scope_view, "_pruned", spy_pruned)
    monkeypatch.setattr(shard_cache, "first_pass", spy_first_pass)
    rng = np.random.default_rng(11)
    embedder = HashingEmbedder(DIM)
    docs = _corpus(rng, SHARD_ROWS, 0, "p1")
    others = _corpus(rng, 2_000, SHARD_ROWS, "p2")
    server_backend = PostgresBackend(pg_dsn, spaces={"local": DIM}, hnsw=False)
    server = SearchIndex(server_backend, embedder)
    device = SearchIndex(SQLiteBackend(spaces={"local": DIM}), embedder)
    for start in range(0, SHARD_ROWS, 5_000):
        prepared = server.prepare(docs[start:start + 5_000])
        server_backend.write(prepared)
        device.backend.write(prepared)
    server_backend.write(server.prepare(others))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE slipstream.docs")
    vocab_docs = _corpus(rng, 60, 10**6, "x")
    vectors = np.stack([embedder.embed([d.embed_text()])[0] for d in docs[:20]])
    cases = []
    for i, d in enumerate(vocab_docs):
        words = d.body.split()[: 1 + i % 3]
        case = {"query": " ".join(words), "k": (10, 30)[i % 2]}
        if i % 4 == 1:  # a dense query vector: the first pass converts blocks of codes
            case["query_vector"] = rng.standard_normal(DIM).astype(np.float32)
        if i % 4 == 2:  # close to a stored row: many near-ties at the top
            case["query_vector"] = vectors[i % 20] + np.float32(1e-3) * rng.standard_normal(DIM).astype(np.float32)
        if i % 5 == 3:
            case["object_types"] = ["task"]
        if i % 7 == 4:
            case["attrs"] = {"b": 2}
        cases.append(case)
    for case in cases:
        case = dict(case)
        text = case.pop("query")
        on_server = server.search(text, partition="p1", **case)
        on_device = device.search(text, partition="p1", **case)
        assert on_device.scope_size == on_server.scope_size == SHARD_ROWS
        assert [(r.key, r.match_type, r.lexical_rank, r.semantic_rank, r.score, r.lexical_score,
                 r.semantic_score) for r in on_server] == \
               [(r.key, r.match_type, r.lexical_rank, r.semantic_rank, r.score, r.lexical_score,
                 r.semantic_score) for r in on_device], (text, case)
    # The fast paths did the work: most lexical queries pruned, every semantic first pass
    # dropped most of the scope.
    assert sum(pruned) >= len(pruned) // 2 > 0
    assert kept and all(size * 4 < total for size, total in kept if total == SHARD_ROWS)
    server_backend.close()
