"""The int8 first pass never drops a row the exact scan ranks in the top `depth`.

Random and adversarial vectors (near-ties, exact duplicates, components half-way
between two codes, huge and subnormal magnitudes, zero rows, sparse queries): every
row's bound is at least the cosine the exact path computes; ranking only what
`first_pass` returns, with the cosines it returns, gives the exact ranking of all rows,
bit for bit, over every slot and over subsets; and its threshold on ``fl(fl(a)·D)``
stays below every bound it leaves uncomputed (`CodeColumns.spread`).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from slipstream.index.quantize import (
    CodeColumns,
    QueryUnit,
    bounded_top,
    first_pass,
    quantize,
)
from slipstream.index.ranking import cosine_of_rows, exact_cosine, row_sq_norms, semantic_rank

DIMS = st.sampled_from([1, 3, 8, 33, 64, 384])


def _adversarial(rng: np.random.Generator, kind: str, n: int, dim: int, q: np.ndarray) -> np.ndarray:
    base = rng.standard_normal((n, dim)).astype(np.float32)
    if kind == "random":
        return base
    if kind == "near_ties":  # copies of a few rows, nudged by an ulp or not at all
        picks = base[rng.integers(0, max(1, n // 8), n)]
        nudge = rng.integers(-1, 2, picks.shape)
        up = np.nextafter(picks, np.float32(np.inf))
        down = np.nextafter(picks, np.float32(-np.inf))
        return np.where(nudge > 0, up, np.where(nudge < 0, down, picks)).astype(np.float32)
    if kind == "query_like":  # rows close to the query: cosines bunch up near 1
        return (q[None, :] + np.float32(1e-4) * base).astype(np.float32)
    if kind == "half_codes":  # components exactly half-way between two int8 codes
        peak = np.float32(1.0)
        codes = rng.integers(-126, 126, (n, dim)).astype(np.float32)
        rows = (codes + np.float32(0.5)) * (peak / np.float32(127))
        rows[:, 0] = peak
        return rows.astype(np.float32)
    if kind == "magnitudes":  # a huge component next to tiny and subnormal ones
        scale = np.float32(10.0) ** rng.integers(-40, 38, (n, 1)).astype(np.float32)
        rows = (base * scale).astype(np.float32)
        rows[: n // 3, 1:] = np.float32(1e-45)
        return rows
    if kind == "zeros_and_signs":
        rows = base.copy()
        rows[::4] = 0.0
        pairs = min(rows[1::4].shape[0], rows[2::4].shape[0])
        rows[1::4][:pairs] = -rows[2::4][:pairs]  # exact opposites
        return rows
    raise AssertionError(kind)


queries_kinds = st.sampled_from(["dense", "sparse", "one_hot", "row"])
row_kinds = st.sampled_from(["random", "near_ties", "query_like", "half_codes", "magnitudes",
                             "zeros_and_signs"])


def _query(rng: np.random.Generator, kind: str, dim: int, rows: np.ndarray | None) -> np.ndarray:
    q = rng.standard_normal(dim).astype(np.float32)
    if kind == "sparse":
        q[rng.random(dim) < 0.9] = 0.0
    elif kind == "one_hot":
        q = np.zeros(dim, np.float32)
        q[rng.integers(dim)] = np.float32(rng.choice([-3.0, 1e-20, 7e30]))
    elif kind == "row" and rows is not None and len(rows):
        q = rows[rng.integers(len(rows))].copy()
    if not q.any():
        q[0] = 1.0
    return q


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dim=DIMS, n=st.integers(1, 300), rows_kind=row_kinds,
       q_kind=queries_kinds, chunks=st.integers(1, 4))
def test_every_bound_is_at_least_the_exact_cosine(seed, dim, n, rows_kind, q_kind, chunks) -> None:
    rng = np.random.default_rng(seed)
    rows, q = _rows_and_query(rng, rows_kind, q_kind, n, dim)
    assert np.all(np.isfinite(rows))
    codes = CodeColumns(dim)
    for part in np.array_split(rows, chunks):  # grown in pieces, as a cache is
        codes.extend(part)
    exact = exact_cosine(rows, q)
    bounds = codes.upper_bounds(q)
    assert np.all(bounds >= exact), (bounds - exact).min()
    subset = np.flatnonzero(rng.random(n) < 0.5)
    if subset.size:
        assert np.all(codes.upper_bounds(q, subset) >= exact[subset])


def _rows_and_query(rng, rows_kind: str, q_kind: str, n: int, dim: int):
    """Rows of `rows_kind` made against a query of `q_kind` ("row": one of the rows)."""
    q = _query(rng, q_kind if q_kind != "row" else "dense", dim, None)
    rows = _adversarial(rng, rows_kind, n, dim, q)
    if q_kind == "row":
        q = _query(rng, "row", dim, rows)
    return rows, q



def test_quantize_round_trip_error_is_within_the_stored_bound() -> None:
    rng = np.random.default_rng(3)
    rows = (rng.standard_normal((200, 48)) * 10.0 ** rng.integers(-5, 5, (200, 1))).astype(np.float32)
    codes, a, g, eps, emax = quantize(rows)
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    scale = a * norms
    residual = rows.astype(np.float64) - scale[:, None] * codes.astype(np.float64)
    assert np.all(np.abs(codes) <= 127)
    assert np.all(np.linalg.norm(residual, axis=1) / norms <= eps)
    assert np.all(np.abs(residual).max(axis=1) / norms <= emax)
    assert np.all(np.abs(residual) <= scale[:, None] * 0.5 * (1 + 1e-6))
    assert np.all(g > 0) and np.all(g < 1e-3)


def test_quantize_rejects_a_flat_array() -> None:
    with pytest.raises(ValueError):
        quantize(np.zeros(4, np.float32))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dim=st.sampled_from([1, 7, 8, 9, 33, 128, 384, 1536]),
       n=st.integers(1, 9000), rows_kind=row_kinds)
def test_cached_row_norms_give_the_cosine_bit_for_bit(seed, dim, n, rows_kind) -> None:
    """A row's squared norm kept by the codes (computed in blocks) is the one the exact
    cosine computes over any subset of rows; the cosine is the same either way."""
    rng = np.random.default_rng(seed)
    q = _query(rng, "dense", dim, None)
    rows = _adversarial(rng, rows_kind, n, dim, q)
    codes = CodeColumns(dim)
    codes.extend(rows)
    pick = np.sort(rng.choice(n, size=min(n, 60), replace=False))
    assert np.array_equal(codes.sq[pick], row_sq_norms(rows[pick]))
    assert np.array_equal(exact_cosine(rows[pick], q, codes.sq[pick]), exact_cosine(rows[pick], q))
    assert np.array_equal(exact_cosine(rows, q)[pick], exact_cosine(rows[pick], q))


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dim=DIMS, n=st.integers(1, 4000), rows_kind=row_kinds,
       q_kind=queries_kinds, depth=st.sampled_from([1, 2, 5, 50]), chunks=st.integers(1, 3),
       subset=st.sampled_from([None, 0.9, 0.3, 0.02]), floor=st.sampled_from([None, 0.3]))
def test_first_pass_on_float32_products_keeps_the_exact_top_depth(seed, dim, n, rows_kind, q_kind, depth, chunks, subset,
                                              floor) -> None:
    """Ranking the rows `first_pass` returns, with the cosines it returns, gives the ranking
    of every row (of the subset), bit for bit; each returned cosine is the exact one."""
    rng = np.random.default_rng(seed)
    rows, q = _rows_and_query(rng, rows_kind, q_kind, n, dim)
    codes = CodeColumns(dim)
    for part in np.array_split(rows, chunks):
        codes.extend(part)
    picked = None if subset is None else np.flatnonzero(rng.random(n) < subset)
    ranked = np.arange(n) if picked is None else picked
    exact = cosine_of_rows(rows, q, codes.sq)
    got, scores = first_pass(codes, q, picked, depth, exact, 0.0 if floor is None else floor)
    assert np.unique(got).size == got.size and np.all(np.isin(got, ranked))
    assert np.array_equal(scores, exact_cosine(rows[got], q))
    keys = [("t", f"{i:05d}", "leaf") for i in range(n)]
    want = semantic_rank([keys[i] for i in ranked], rows[ranked], q, depth=depth, min_score=floor)
    assert semantic_rank([keys[i] for i in got], rows[got], q, depth=depth, min_score=floor,
                         scores=scores) == want


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dim=DIMS, n=st.integers(1, 2000), rows_kind=row_kinds,
       q_kind=queries_kinds)
def test_every_bound_lies_within_the_spread_of_its_float32_product(seed, dim, n, rows_kind, q_kind) -> None:
    """What `first_pass` leaves out unbounded: ``ub ≤ fl(fl(a)·D) + spread`` for every row."""
    rng = np.random.default_rng(seed)
    rows, q = _rows_and_query(rng, rows_kind, q_kind, n, dim)
    codes = CodeColumns(dim)
    codes.extend(rows)
    unit = QueryUnit.of(q)
    dots = codes.dots(unit.u32)
    s = codes.a32[:n] * dots
    bounds = codes.bounds_of(unit, dots, slice(0, n))
    assert np.array_equal(bounds, codes.upper_bounds(q))
    assert np.all(bounds <= s.astype(np.float64) + codes.spread(unit))


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 30_000), depth=st.sampled_from([1, 5, 50]),
       shape=st.sampled_from(["spread", "flat", "few_high", "ties", "zeros"]))
def test_bounded_top_holds_every_value_at_its_threshold(seed, n, depth, shape) -> None:
    rng = np.random.default_rng(seed)
    values = (rng.random(n) ** 8).astype(np.float32)
    if shape == "flat":
        values[:] = 0.25
    elif shape == "few_high":
        values[rng.integers(0, n, 3)] = 2.0
    elif shape == "ties":
        values = np.round(values * 4) / np.float32(4)
    elif shape == "zeros":
        values[rng.random(n) < 0.995] = 0.0
    depth = min(depth, n)
    above, threshold = bounded_top(values, depth)
    assert above.size >= depth
    assert np.array_equal(above, np.flatnonzero(values >= threshold))
    assert threshold <= np.sort(values)[n - depth]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dim=DIMS, n=st.integers(1, 500), rows_kind=row_kinds)
def test_cosine_of_rows_is_exact_cosine_bit_for_bit(seed, dim, n, rows_kind) -> None:
    rng = np.random.default_rng(seed)
    q = _query(rng, "dense", dim, None)
    rows = _adversarial(rng, rows_kind, n, dim, q)
    sq = row_sq_norms(rows)
    pick = rng.permutation(n)[: int(rng.integers(0, n + 1))]
    assert np.array_equal(cosine_of_rows(rows, q, sq)(pick), exact_cosine(rows[pick], q, sq[pick]))


def test_first_pass_reads_the_float32_rows_of_few_candidates() -> None:
    """Not a safety property: the first pass must compute few exact cosines, or it is no faster."""
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((20_000, 384)).astype(np.float32)
    q = rng.standard_normal(384).astype(np.float32)
    codes = CodeColumns(384)
    codes.extend(rows)
    read: list[int] = []
    exact = cosine_of_rows(rows, q, codes.sq)
    got, _ = first_pass(codes, q, None, 50, lambda r: (read.append(r.size), exact(r))[1])
    assert 50 <= got.size == sum(read) < 1000
