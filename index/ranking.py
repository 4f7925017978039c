"""The ranking, written once and run identically for every backend.

Backends only find candidates and count; every score is computed here, in the same
order with the same arithmetic, which is what makes a device shard rank exactly as
the server does.

Lexical channel: BM25 with two fields (BM25F-style)
---------------------------------------------------
Constants: ``k1 = 1.2``, ``b = 0.75``, field weights ``W_TITLE = 2.0`` (title and
keywords) and ``W_BODY = 1.0`` (body).

The *scope* is the live (not deleted) rows of the query's partitions — every object
type and node kind, whatever filters the query has. Over the scope:

* ``N``      = number of rows,
* ``avgdl``  = ``(W_TITLE·Σ len_title + W_BODY·Σ len_body) / N`` (1.0 when that is 0),
* ``df(t)``  = number of rows with term ``t`` in either field.

For a row ``d`` and term ``t``:

* ``tf(t,d)  = W_TITLE·tf_title(t,d) + W_BODY·tf_body(t,d)``
* ``len(d)   = W_TITLE·len_title(d) + W_BODY·len_body(d)``
* ``idf(t)   = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5))``

Query terms are the distinct analysed terms of the query (OR semantics: a row
matches if it has any of them). The score is summed over the query terms in sorted
order, in float64::

    score(d) = Σ_t idf(t) · tf(t,d)·(k1 + 1) / (tf(t,d) + k1·(1 − b + b·len(d)/avgdl))

Filters (object types, node kinds, attrs) choose which rows are ranked; they never
change N, avgdl or df.

Semantic channel: exact cosine
------------------------------
``cos(q, v) = (q·v) / (‖q‖·‖v‖)`` computed in float64 from the float32 components
(each product is exact in float64), row by row with NumPy's pairwise summation.
Only rows with a positive cosine (and at least ``min_semantic_score``, when given)
are semantic matches. Backends may pre-select candidates with a float32 or pgvector
distance; they must
keep every row within `CANDIDATE_MARGIN` of the cut-off, which is far wider than
float32 error, so the exact ranking of the top rows is the same everywhere.

Fusion
------
Each channel ranks its rows by (score descending, key ascending) and keeps the first
`depth`. Reciprocal Rank Fusion with ``K = 60``: a row scores ``Σ_c w_c / (K + rank_c)``
over the channels that ranked it, with the mode's weights. Rows are ordered by
(fused score descending, (object_type, object_id, node_kind) ascending); then
collapse keeps each object's best row, and a diversity cap drops (not defers) rows
past the cap of their group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter

import numpy as np

from .doc import DocKey
from .errors import ValidationError

K1 = 1.2
B = 0.75
W_TITLE = 2.0
W_BODY = 1.0
RRF_K = 60
CANDIDATE_MARGIN = 1e-3

MODES: dict[str, tuple[float, float]] = {
    # mode: (lexical weight, semantic weight)
    "balanced": (1.0, 1.0),
    "precision": (1.5, 0.5),
    "explore": (0.5, 1.5),
}


@dataclass(frozen=True, slots=True)
class ScopeStats:
    n_docs: int
    sum_len_title: int
    sum_len_body: int

    @property
    def avgdl(self) -> float:
        if self.n_docs == 0:
            return 1.0
        total = W_TITLE * self.sum_len_title + W_BODY * self.sum_len_body
        return total / self.n_docs if total > 0 else 1.0


@dataclass(frozen=True, slots=True)
class LexicalCandidate:
    """A scope row holding at least one query term; `tfs[i]` is (title, body) tf of term i."""

    key: DocKey
    len_title: int
    len_body: int
    tfs: tuple[tuple[int, int], ...]
    selected: bool  # passes the query's filters


def parse_tf(value: object) -> tuple[int, int]:
    """A stored (title, body) term frequency pair, or (0, 0) when the term is absent."""
    if value is None:
        return (0, 0)
    if isinstance(value, str):
        import json

        value = json.loads(value)
    t, b = value  # type: ignore[misc]
    return (int(t), int(b))


def bm25_rank(
    terms: Sequence[str], stats: ScopeStats, candidates: Iterable[LexicalCandidate]
) -> list[tuple[DocKey, float]]:
    """Score the selected candidates; returns (key, score) ordered by score desc, key asc."""
    cands = list(candidates)
    df = [0] * len(terms)
    for c in cands:
        for i, (t, b) in enumerate(c.tfs):
            if t or b:
                df[i] += 1
    n = stats.n_docs
    idf = [math.log(1.0 + (n - d + 0.5) / (d + 0.5)) for d in df]
    avgdl = stats.avgdl
    scored: list[tuple[DocKey, float]] = []
    for c in cands:
        if not c.selected:
            continue
        norm = K1 * (1.0 - B + B * (W_TITLE * c.len_title + W_BODY * c.len_body) / avgdl)
        score = 0.0
        for i, (t, b) in enumerate(c.tfs):
            tf = W_TITLE * t + W_BODY * b
            if tf:
                score += idf[i] * tf * (K1 + 1.0) / (tf + norm)
        if score > 0.0:
            scored.append((c.key, score))
    scored.sort(key=lambda kv: (-kv[1], kv[0]))
    return scored


def exact_cosine(matrix: np.ndarray, query: np.ndarray, sq_norms: np.ndarray | None = None) -> np.ndarray:
    """Cosine of each row of `matrix` (float32) with `query` (float32), in float64.

    `sq_norms`, when given, are the rows' ``(m·m).sum(axis=1)`` already computed (by
    `row_sq_norms`, which is that expression): a row's value does not depend on the
    other rows of the matrix, so a cache may keep it per row."""
    m = np.asarray(matrix, dtype=np.float32)
    if m.ndim != 2 or m.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    sq = row_sq_norms(m) if sq_norms is None else np.asarray(sq_norms, dtype=np.float64)
    return cosine_of_rows(m, query, sq)(slice(None))


def cosine_of_rows(matrix: np.ndarray, query: np.ndarray,
                   sq_norms: np.ndarray) -> Callable[[np.ndarray | slice], np.ndarray]:
    """``rows -> exact_cosine(matrix[rows], query, sq_norms[rows])``: the query's terms
    computed once, then for the rows asked, their float64 products with it summed along
    the row, over the product of the norms (0.0 where either norm is 0).
    `exact_cosine` is this over every row."""
    q = np.asarray(query, dtype=np.float32).astype(np.float64)
    q_norm = math.sqrt(float((q * q).sum()))

    def exact(rows: np.ndarray) -> np.ndarray:
        m = matrix[rows].astype(np.float64)
        np.multiply(m, q, out=m)
        dots = m.sum(axis=1)
        norms = np.sqrt(sq_norms[rows]) * q_norm
        return np.divide(dots, norms, out=np.zeros(dots.size), where=norms > 0)

    return exact


def row_sq_norms(matrix: np.ndarray) -> np.ndarray:
    """Each row's squared norm exactly as `exact_cosine` computes it."""
    m = np.asarray(matrix, dtype=np.float32).astype(np.float64)
    return (m * m).sum(axis=1)


def semantic_rank(
    keys: Sequence[DocKey], matrix: np.ndarray, query: np.ndarray, *, depth: int,
    min_score: float | None, scores: np.ndarray | None = None,
) -> list[tuple[DocKey, float]]:
    """Exact-cosine ranking of candidate rows: (key, score), score desc then key asc.

    `scores`, when given, are the rows' `exact_cosine` already computed (it is row by
    row: a row's cosine does not depend on the other rows of the matrix)."""
    if not keys:
        return []
    cos = exact_cosine(matrix, query) if scores is None else scores
    floor = 0.0 if min_score is None else min_score
    hit = np.flatnonzero((cos > 0.0) & (cos >= floor))
    ranked = sorted(zip((-cos[hit]).tolist(), [keys[i] for i in hit.tolist()]))
    return [(key, -neg) for neg, key in ranked[:depth]]


def margin_cut(approx_scores: np.ndarray, depth: int) -> float:
    """The lowest approximate score a candidate may have and still reach the exact top `depth`."""
    if approx_scores.size <= depth:
        return -math.inf
    kth = np.partition(approx_scores, approx_scores.size - depth)[approx_scores.size - depth]
    return float(kth) - CANDIDATE_MARGIN


@dataclass(slots=True)
class Fused:
    key: DocKey
    score: float = 0.0
    lexical_rank: int | None = None
    semantic_rank: int | None = None
    lexical_score: float | None = None
    semantic_score: float | None = None

    @property
    def match_type(self) -> str:
        if self.lexical_rank is not None and self.semantic_rank is not None:
            return "hybrid"
        return "lexical" if self.lexical_rank is not None else "semantic"


def check_mode(mode: str) -> tuple[float, float]:
    try:
        return MODES[mode]
    except KeyError:
        raise ValidationError(f"mode must be one of {sorted(MODES)}, got {mode!r}") from None


def fuse(
    lexical: Sequence[tuple[DocKey, float]], semantic: Sequence[tuple[DocKey, float]], *,
    mode: str, depth: int,
) -> list[Fused]:
    """Weighted RRF over the first `depth` rows of each channel."""
    w_lex, w_sem = check_mode(mode)
    rows: dict[DocKey, Fused] = {}
    for rank, (key, score) in enumerate(lexical[:depth], start=1):
        f = rows.setdefault(key, Fused(key))
        f.lexical_rank, f.lexical_score = rank, score
        f.score += w_lex / (RRF_K + rank)
    for rank, (key, score) in enumerate(semantic[:depth], start=1):
        f = rows.setdefault(key, Fused(key))
        f.semantic_rank, f.semantic_score = rank, score
        f.score += w_sem / (RRF_K + rank)
    return sorted(rows.values(), key=lambda f: (-f.score, f.key))


def collapse_and_cap(
    fused: Sequence[Fused], *, collapse: bool, group_of: Callable[[DocKey], object] | None,
    cap: int | None, k: int,
) -> list[tuple[Fused, tuple[str, ...]]]:
    """Collapse node kinds into each object's best row, apply the diversity cap, keep `k`.

    Returns (row, matched_node_kinds) pairs in rank order.
    """
    kinds: dict[tuple[str, str], list[str]] = {}
    best: list[Fused] = []
    for f in fused:
        obj = (f.key[0], f.key[1])
        if collapse:
            if obj not in kinds:
                kinds[obj] = []
                best.append(f)
            kinds[obj].append(f.key[2])
        else:
            best.append(f)
    out: list[tuple[Fused, tuple[str, ...]]] = []
    per_group: dict[object, int] = {}
    for f in best:
        if group_of is not None and cap is not None:
            group = group_of(f.key)
            if per_group.get(group, 0) >= cap:
                continue
            per_group[group] = per_group.get(group, 0) + 1
        matched = tuple(sorted(set(kinds[(f.key[0], f.key[1])]))) if collapse else (f.key[2],)
        out.append((f, matched))
        if len(out) >= k:
            break
    return out


def fuse_and_collapse(
    lexical: Sequence[tuple[DocKey, float]], semantic: Sequence[tuple[DocKey, float]], *,
    mode: str, depth: int, collapse: bool, group_of: Callable[[DocKey], object] | None,
    cap: int | None, k: int,
) -> list[tuple[Fused, tuple[str, ...]]]:
    """``collapse_and_cap(fuse(...), ...)``, the same rows and floats, without building a
    `Fused` for every fused row: scores are summed in the same order (lexical, then
    semantic) and rows sorted by the same key; only the rows returned become `Fused`."""
    w_lex, w_sem = check_mode(mode)
    lex = {key: (rank, score) for rank, (key, score) in enumerate(lexical[:depth], start=1)}
    sem = {key: (rank, score) for rank, (key, score) in enumerate(semantic[:depth], start=1)}
    fused: dict[DocKey, float] = {key: 0.0 + w_lex / (RRF_K + rank) for key, (rank, _) in lex.items()}
    for key, (rank, _) in sem.items():
        fused[key] = fused.get(key, 0.0) + w_sem / (RRF_K + rank)
    order = sorted([(-score, key) for key, score in fused.items()])
    kinds: dict[tuple[str, str], list[str]] = {}
    if collapse:
        for key in fused:
            kinds.setdefault((key[0], key[1]), []).append(key[2])
    out: list[tuple[Fused, tuple[str, ...]]] = []
    seen: set[tuple[str, str]] = set()
    per_group: dict[object, int] = {}
    for neg, key in order:
        if not _admit(key, collapse, seen, group_of, cap, per_group):
            continue
        f = Fused(key, -neg)
        if key in lex:
            f.lexical_rank, f.lexical_score = lex[key]
        if key in sem:
            f.semantic_rank, f.semantic_score = sem[key]
        out.append((f, tuple(sorted(set(kinds[(key[0], key[1])]))) if collapse else (key[2],)))
        if len(out) >= k:
            break
    return out


def _admit(key: DocKey, collapse: bool, seen: set[tuple[str, str]], group_of, cap: int | None,
           per_group: dict[object, int]) -> bool:
    """Whether the next row in fused order is returned: the first of its object when
    collapsing (its object is then taken), and within its diversity group's cap."""
    if collapse:
        obj = (key[0], key[1])
        if obj in seen:
            return False
        seen.add(obj)
    if group_of is not None and cap is not None:
        group = group_of(key)
        if per_group.get(group, 0) >= cap:
            return False
        per_group[group] = per_group.get(group, 0) + 1
    return True


# -- the same ranking and fusion over integer row ids ----------------------------------------
#
# A device holds its rows in numbered slots. Ranking and fusing slot numbers, with a
# row's key looked up only to break a tie, gives the rows, order and floats that the
# functions above give for the rows' keys; only the rows returned become objects.


def rank_ids(ids: np.ndarray, scores: np.ndarray, depth: int,
             key_of: Callable[[int], DocKey]) -> tuple[list[int], list[float]]:
    """The first `depth` of `ids` by (score descending, key ascending), and their scores.

    As ``sorted(zip(keys, scores), key=lambda kv: (-kv[1], kv[0]))[:depth]`` ranks the
    ids' keys; the ids must name distinct keys. Keys are read only within runs of
    equal scores."""
    n = ids.size
    if n > depth:
        kth = np.partition(scores, n - depth)[n - depth]
        keep = (scores >= kth).nonzero()[0]
        ids, scores = ids[keep], scores[keep]
    order = (-scores).argsort(kind="stable")
    ranked, values = scores[order], ids[order].tolist()
    tied = (ranked[1:] == ranked[:-1]).nonzero()[0].tolist()
    ranked_list = ranked.tolist()
    i = 0
    while i < len(tied) and tied[i] < depth:
        start = end = tied[i]
        while i < len(tied) and tied[i] == end:  # tied[i] == p: positions p and p + 1 tie
            end += 1
            i += 1
        values[start:end + 1] = sorted(values[start:end + 1], key=key_of)
    return values[:depth], ranked_list[:depth]


_RRF_TERMS: dict[tuple[float, int], list[float]] = {}


def _rrf_terms(weight: float, n: int) -> list[float]:
    """``weight / (RRF_K + rank)`` for ranks 1..n, as `fuse` computes each."""
    found = _RRF_TERMS.get((weight, n))
    if found is None:
        found = _RRF_TERMS[(weight, n)] = [weight / (RRF_K + rank) for rank in range(1, n + 1)]
    return found


def fuse_ids(lexical: Sequence[int], semantic: Sequence[int], *, mode: str) -> dict[int, float]:
    """Weighted RRF over two channels given as ranked ids: id -> fused score, summed as
    `fuse` sums it (from 0.0, the lexical term, then the semantic one; 0.0 + x is x).
    The order of the ids is not the ranking: see `order_ids`."""
    w_lex, w_sem = check_mode(mode)
    at_lex = dict(zip(lexical, _rrf_terms(w_lex, len(lexical))))
    at_sem = dict(zip(semantic, _rrf_terms(w_sem, len(semantic))))
    fused = {**at_sem, **at_lex}
    for row in at_lex.keys() & at_sem.keys():
        fused[row] = at_lex[row] + at_sem[row]
    return fused


def order_ids(fused: Mapping[int, float], key_of: Callable[[int], DocKey]) -> Iterator[int]:
    """The ids by (fused score descending, key ascending); a run of equal scores is sorted
    by key only when the walk reaches it."""
    ranked = sorted(fused.items(), key=itemgetter(1), reverse=True)  # stable: ties keep order
    n, i = len(ranked), 0
    while i < n:
        score, j = ranked[i][1], i + 1
        while j < n and ranked[j][1] == score:
            j += 1
        if j == i + 1:
            yield ranked[i][0]
        else:
            yield from sorted((row for row, _ in ranked[i:j]), key=key_of)
        i = j


def fuse_ids_and_collapse(
    lexical: tuple[Sequence[int], Sequence[float]], semantic: tuple[Sequence[int], Sequence[float]], *,
    mode: str, key_of: Callable[[int], DocKey], collapse: bool,
    group_of: Callable[[DocKey], object] | None, cap: int | None, k: int, one_kind: bool = False,
) -> list[tuple[int, Fused, tuple[str, ...]]]:
    """`fuse_and_collapse` over ranked ids (each channel: ids, scores; at most `depth`):
    (id, row, matched_node_kinds) for the rows returned, the same rows, floats and kinds.

    `one_kind` tells that every row has the same node kind, so an object has one row and
    collapse leaves every row, with its own kind."""
    fused = fuse_ids(lexical[0], semantic[0], mode=mode)
    kinds: dict[tuple[str, str], list[str]] = {}
    if collapse and not one_kind:
        for row in fused:
            key = key_of(row)
            kinds.setdefault((key[0], key[1]), []).append(key[2])
    lex_rank = dict(zip(lexical[0], range(1, len(lexical[0]) + 1)))
    sem_rank = dict(zip(semantic[0], range(1, len(semantic[0]) + 1)))
    out: list[tuple[int, Fused, tuple[str, ...]]] = []
    seen: set[tuple[str, str]] = set()
    per_group: dict[object, int] = {}
    for row in order_ids(fused, key_of):
        key = key_of(row)
        if not _admit(key, collapse and not one_kind, seen, group_of, cap, per_group):
            continue
        f = Fused(key, fused[row])
        rank = lex_rank.get(row)
        if rank is not None:
            f.lexical_rank, f.lexical_score = rank, lexical[1][rank - 1]
        rank = sem_rank.get(row)
        if rank is not None:
            f.semantic_rank, f.semantic_score = rank, semantic[1][rank - 1]
        matched = tuple(sorted(set(kinds[(key[0], key[1])]))) if collapse and not one_kind else (key[2],)
        out.append((row, f, matched))
        if len(out) >= k:
            break
    return out


def group_lookup(attrs_by_key: Mapping[DocKey, Mapping[str, object]], diversity_key: str):
    """The diversity group of a row: its object_type, its node_kind, or one of its attrs."""
    if diversity_key == "object_type":
        return lambda key: key[0]
    if diversity_key == "node_kind":
        return lambda key: key[2]
    return lambda key: repr(attrs_by_key.get(key, {}).get(diversity_key))
