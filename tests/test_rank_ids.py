"""Ranking and fusing row ids gives what ranking and fusing the rows' keys gives.

`rank_ids` against ``sorted(..., key=(-score, key))[:depth]``, and
`fuse_ids_and_collapse` against `fuse_and_collapse` (itself held to
``collapse_and_cap(fuse(...))``): the same rows, order, floats, ranks and kinds,
over random channels and adversarial ties (few distinct scores, keys in the reverse
order of the ids, ties across the depth cut), every mode, collapse on and off, a
diversity cap. Then a device shard end to end: `SQLiteBackend.search_fused`
against the path through `retrieve` and `fetch`.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from slipstream.index import HashingEmbedder, IndexDoc, SearchIndex, SQLiteBackend, ranking
from slipstream.index.ranking import fuse_and_collapse, fuse_ids_and_collapse, rank_ids

KINDS = ["leaf", "summary", "chunk"]


def _keys(n: int, reverse: bool, kinds: int) -> list[tuple[str, str, str]]:
    """n distinct keys, id i -> key; several node kinds per object when `kinds` > 1."""
    keys = [("doc" if i % 3 else "note", f"{i // kinds:04d}", KINDS[i % kinds]) for i in range(n)]
    return keys[::-1] if reverse else keys


def _scores(rng: np.random.Generator, n: int, distinct: int) -> np.ndarray:
    """Positive float64 scores with only `distinct` values: many exact ties."""
    values = rng.random(distinct) + 0.01
    return values[rng.integers(0, distinct, n)]


def _reference(keys, ids, scores, depth):
    rows = sorted(((keys[i], s) for i, s in zip(ids.tolist(), scores.tolist())),
                  key=lambda kv: (-kv[1], kv[0]))
    return rows[:depth]


@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 300), distinct=st.sampled_from([1, 2, 5, 1000]),
       depth=st.sampled_from([1, 3, 10, 50]), reverse=st.booleans(), kinds=st.integers(1, 3))
def test_rank_ids_ranks_as_keys_rank(seed, n, distinct, depth, reverse, kinds) -> None:
    rng = np.random.default_rng(seed)
    keys = _keys(n, reverse, kinds)
    ids = rng.permutation(n)[: int(rng.integers(0, n + 1))]
    scores = _scores(rng, ids.size, distinct)
    got_ids, got_scores = rank_ids(ids, scores, depth, keys.__getitem__)
    assert [(keys[i], s) for i, s in zip(got_ids, got_scores)] == _reference(keys, ids, scores, depth)
    assert all(type(i) is int for i in got_ids) and all(type(s) is float for s in got_scores)


def _channel(rng: np.random.Generator, n: int, size: int, distinct: int):
    ids = rng.permutation(n)[:size]
    return ids, _scores(rng, ids.size, distinct)


@settings(max_examples=600, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 120), lex_size=st.integers(0, 60),
       sem_size=st.integers(0, 60), distinct=st.sampled_from([1, 3, 1000]),
       depth=st.sampled_from([1, 5, 20, 50]), mode=st.sampled_from(sorted(ranking.MODES)),
       collapse=st.booleans(), cap=st.sampled_from([None, 1, 2]),
       group=st.sampled_from(["object_type", "node_kind"]), k=st.integers(1, 15),
       reverse=st.booleans(), kinds=st.integers(1, 3))
def test_fused_ids_equal_fused_keys(seed, n, lex_size, sem_size, distinct, depth, mode, collapse, cap,
                                    group, k, reverse, kinds) -> None:
    """Both channels share rows (hybrid rows), RRF ties abound (rank r in one channel only
    against rank r in the other, in balanced mode), objects have several node kinds."""
    rng = np.random.default_rng(seed)
    keys = _keys(n, reverse, kinds)
    lex_ids, lex_scores = rank_ids(*_channel(rng, n, lex_size, distinct), depth, keys.__getitem__)
    sem_ids, sem_scores = rank_ids(*_channel(rng, n, sem_size, distinct), depth, keys.__getitem__)
    group_of = ranking.group_lookup({}, group) if cap is not None else None
    want = fuse_and_collapse([(keys[i], s) for i, s in zip(lex_ids, lex_scores)],
                             [(keys[i], s) for i, s in zip(sem_ids, sem_scores)], mode=mode, depth=depth,
                             collapse=collapse, group_of=group_of, cap=cap, k=k)
    got = fuse_ids_and_collapse((lex_ids, lex_scores), (sem_ids, sem_scores), mode=mode,
                                key_of=keys.__getitem__, collapse=collapse, group_of=group_of, cap=cap,
                                k=k, one_kind=kinds == 1)

    def flat(rows):
        return [(f.key, f.score, f.lexical_rank, f.lexical_score, f.semantic_rank, f.semantic_score,
                 f.match_type, matched) for f, matched in rows]

    assert flat((f, matched) for _, f, matched in got) == flat(want)
    assert [keys[i] for i, _, _ in got] == [f.key for f, _ in want]


# -- a device shard: the fused path against retrieve + fetch --------------------------------

DIM = 16
WORDS = ["apple", "banana", "cherry", "grocery", "list", "meeting", "notes", "plan", "report", "invoice"]


class _Unfused:
    """The same backend without `search_fused`: `SearchIndex` takes the path through
    `retrieve`, `ranking.semantic_rank`, `fuse_and_collapse` and `fetch`."""

    def __init__(self, backend: SQLiteBackend) -> None:
        self._backend = backend

    def __getattr__(self, name: str):
        if name == "search_fused":
            raise AttributeError(name)
        return getattr(self._backend, name)


def _docs(rng: np.random.Generator, n: int, kinds: int) -> list[IndexDoc]:
    p = 1.0 / np.arange(1, len(WORDS) + 1)
    p /= p.sum()

    def text(count: int) -> str:
        return " ".join(WORDS[i] for i in rng.choice(len(WORDS), size=count, p=p))

    return [IndexDoc("note" if i % 4 else "task", str(i // kinds), node_kind=KINDS[i % kinds],
                     title=text(int(rng.integers(0, 3))), body=text(int(rng.integers(0, 6))),
                     partition=("p1", "p2")[int(rng.integers(0, 2))],
                     attrs={"color": ("red", "blue")[i % 2]}, payload={"n": i, "tags": ["x"]})
            for i in range(n)]


def _summary(results) -> list[tuple]:
    return [(r.key, r.partition, r.title, r.payload, r.attrs, r.score, r.match_type, r.lexical_rank,
             r.semantic_rank, r.lexical_score, r.semantic_score, r.matched_node_kinds) for r in results]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.sampled_from([5, 60, 400, 4000]), kinds=st.integers(1, 3),
       deletes=st.booleans())
def test_a_shard_answers_the_same_through_the_fused_path(seed, n, kinds, deletes) -> None:
    rng = np.random.default_rng(seed)
    backend = SQLiteBackend(spaces={"local": DIM})
    fused = SearchIndex(backend, HashingEmbedder(DIM))
    plain = SearchIndex(_Unfused(backend), HashingEmbedder(DIM), check_embedders=False)
    docs = _docs(rng, n, kinds)
    fused.upsert_many(docs[: n // 2])
    fused.search("warm", k=3)  # the cache is loaded; the second half goes in incrementally
    fused.upsert_many(docs[n // 2:])
    if deletes:
        for d in docs[:: 7]:
            fused.delete(d.object_type, d.object_id, d.node_kind)
    options = [{}, {"k": 3}, {"k": 30}, {"partition": "p1"}, {"partition": ["p1", "p2"]},
               {"object_types": ["task"]}, {"node_kinds": ["summary", "chunk"]}, {"attrs": {"color": "red"}},
               {"mode": "precision"}, {"mode": "explore"}, {"collapse": False},
               {"min_semantic_score": 0.3}, {"diversity_key": "object_type", "diversity_cap": 2},
               {"diversity_key": "node_kind", "diversity_cap": 1},
               {"query_vector": rng.standard_normal(DIM).astype(np.float32)}]
    for i in range(12):
        text = " ".join(WORDS[j] for j in rng.choice(len(WORDS), size=int(rng.integers(1, 4))))
        for option in options:
            got = fused.search(text, **option)
            want = plain.search(text, **option)
            assert _summary(got) == _summary(want), (text, option)
            assert got.scope_size == want.scope_size and got.approximate == want.approximate
    backend.close()
