"""int8 codes for a device's vectors, with a provable per-row bound on the cosine.

The semantic channel ranks by exact float64 cosine (`ranking.exact_cosine`). Reading
every float32 vector of a large shard costs more than the rest of a query, so a first
pass reads one byte per component instead and keeps only the rows that *could* reach
the top `depth`; those are re-scored exactly. Nothing the exact scan would rank in the
top `depth` is ever dropped, so results are identical, bit for bit.

Codes and the bound
-------------------
For a float32 row ``v`` (dimension ``d``): scale ``s = max|v_i| / 127`` (a float32),
codes ``c_i = round(v_i / s)`` in ``[-127, 127]``, residual ``e = v - s·c`` (computed
exactly in float64: ``s·c_i`` has at most 31 significant bits). For the query,
normalised to ``u = q/‖q‖`` in float64 and rounded to float32 ``û`` (``δ = u - û``)::

    cos(q, v) = u·v / ‖v‖ = (s·(û·c) + û·e + δ·v) / ‖v‖
             ≤ a·(û·c) + min(‖û‖·‖e‖, ‖û‖₁·max|e_i|)/‖v‖ + ‖δ‖,       a = s/‖v‖

(Cauchy–Schwarz, or Hölder, tighter for a query with few non-zero components).
``û·c`` is computed in float32; whatever the order of summation its error is at most
``γ·Σ|û_i c_i| ≤ γ·‖û‖·‖c‖`` with ``γ = 2·d·2⁻²⁴``. So, per row::

    ub = a·D + ‖û‖·g + min(‖û‖·eps, ‖û‖₁·emax) + ‖δ‖ + SLACK

with ``D`` the float32 dot product and, stored per row (rounded up), ``a``,
``g = γ·a·‖c‖``, ``eps = ‖e‖/‖v‖`` and ``emax = max|e_i|/‖v‖``;
and ``SLACK`` covering the float64 rounding of this sum and of the exact cosine itself
(both below 1e-13 for values of magnitude ≤ 1). ``ub`` is therefore at least the cosine
the exact path computes.

A first pass takes `depth` rows, computes their exact cosine, and keeps every row
whose bound reaches the lowest of those (and the score floor). Any row of the exact
top `depth` has a cosine at least that high, hence a bound at least that high: it
survives. Any `depth` rows give a valid cut this way; rows with high bounds give a
tight one.

`first_pass` does this without a float64 bound for every row. Its rows of
the cut are the `depth` highest float32 products ``s = fl(fl(a)·D)``, and its cut is
turned into a threshold on ``s`` that the bound of every row left out stays below:
``ub ≤ s + M + ‖û‖·max g + min(‖û‖·max eps, ‖û‖₁·max emax) + ‖δ‖ + SLACK``, with the
maxima taken over the shard's rows and ``M`` the float32 rounding of ``s`` (at most
``3·2⁻²⁴·|a·D| + 2⁻¹⁴⁹``, and ``|a·D| ≤ (1+γ)·‖û‖·a·‖c‖ ≤ (1+γ)·‖û‖·max g/γ``). Only
the few rows above that threshold get their full bound, which then decides as above.

Codes are stored column-major (a row of the array per dimension), so a query with
few non-zero components (hashed features, for instance) reads only those columns;
a dense query converts blocks of codes to float32 and multiplies them with BLAS.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .ranking import row_sq_norms

SLACK = 1e-9
_U32 = 2.0 ** -24
BLOCK = 512  # rows per block of the dense pass: a small product BLAS runs on one thread
SPARSE_FRACTION = 8  # a query with at most d/8 non-zero components reads only those columns


def gamma(dim: int) -> float:
    """A bound on the relative error of a float32 dot product of length `dim`, any order."""
    return 2.0 * dim * _U32


def quantize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """int8 codes, and the per-row terms of the bound, for float32 rows.

    Returns ``(codes, a, g, eps, emax)``: ``a = s/‖v‖``, ``g = γ·a·‖c‖`` (float32
    rounding of the dot product), ``eps = ‖e‖/‖v‖`` and ``emax = max|e_i|/‖v‖`` (the
    residual, for the Cauchy–Schwarz and the ``‖û‖₁·max|e_i|`` forms of ``|û·e|``),
    the last three rounded up. Rows whose norm is zero get zeros.
    """
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError("quantize takes a 2-D array of rows")
    n, dim = v.shape
    v64 = v.astype(np.float64)
    peak = np.abs(v).max(axis=1) if dim else np.zeros(n, np.float32)
    scale = (peak / np.float32(127)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1)).astype(np.float64)
    codes64 = np.clip(np.rint(v64 / safe[:, None]), -127, 127)
    codes64[scale == 0] = 0
    codes = codes64.astype(np.int8)
    residual = v64 - scale.astype(np.float64)[:, None] * codes64
    norm_v = np.sqrt((v64 * v64).sum(axis=1))
    norm_e = np.sqrt((residual * residual).sum(axis=1))
    max_e = np.abs(residual).max(axis=1) if dim else np.zeros(n)
    norm_c = np.sqrt((codes64 * codes64).sum(axis=1))
    live = norm_v > 0
    inv = np.divide(1.0, norm_v, out=np.zeros(n), where=live)
    a = scale.astype(np.float64) * inv
    # Round up generously: the float64 arithmetic above is good to ~1e-15 relative.
    up = 1.0 + 1e-6
    g = np.where(live, gamma(dim) * a * norm_c * up + 1e-12, 0.0)
    eps = np.where(live, norm_e * inv * up + 1e-12, 0.0)
    emax = np.where(live, max_e * inv * up + 1e-12, 0.0)
    return codes, a, g, eps, emax


class CodeColumns:
    """Growable column-major int8 codes plus the per-row terms of the bound, one slot per row.

    Besides the float64 terms it keeps ``a`` rounded to float32 (for `first_pass`) and
    the largest ``g``, ``eps`` and ``emax`` of any row it ever held: rows removed from
    the shard only make these maxima looser, never wrong."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.codes_t = np.zeros((dim, 16), np.int8)
        self.a = np.zeros(16, np.float64)
        self.a32 = np.zeros(16, np.float32)
        self.g_max = self.eps_max = self.emax_max = 0.0
        self.g = np.zeros(16, np.float64)
        self.eps = np.zeros(16, np.float64)
        self.emax = np.zeros(16, np.float64)
        self.sq = np.zeros(16, np.float64)  # each row's squared norm, as the exact cosine takes it
        self.n = 0

    def _reserve(self, extra: int) -> None:
        need = self.n + extra
        cap = self.a.shape[0]
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        codes_t = np.zeros((self.dim, cap), np.int8)
        codes_t[:, : self.n] = self.codes_t[:, : self.n]
        self.codes_t = codes_t
        for name in ("a", "g", "eps", "emax", "sq", "a32"):
            old = getattr(self, name)
            grown = np.zeros(cap, old.dtype)
            grown[: self.n] = old[: self.n]
            setattr(self, name, grown)

    def trim(self) -> None:
        """Drop the spare capacity (after a bulk load)."""
        keep = max(self.n, 1)
        self.codes_t = self.codes_t[:, :keep].copy()
        for name in ("a", "g", "eps", "emax", "sq", "a32"):
            setattr(self, name, getattr(self, name)[:keep].copy())

    def extend(self, vectors: np.ndarray) -> None:
        """Append rows (float32, zero rows for slots without a vector)."""
        vectors = np.asarray(vectors, np.float32).reshape(-1, self.dim)
        k = vectors.shape[0]
        if k == 0:
            return
        self._reserve(k)
        for start in range(0, k, 4096):  # float64 temporaries stay small
            codes, *terms = quantize(vectors[start:start + 4096])
            at = self.n + start
            self.codes_t[:, at: at + codes.shape[0]] = codes.T
            for name, values in zip(("a", "g", "eps", "emax"), terms):
                getattr(self, name)[at: at + codes.shape[0]] = values
            self.a32[at: at + codes.shape[0]] = terms[0]
            self.g_max = max(self.g_max, float(terms[1].max()))
            self.eps_max = max(self.eps_max, float(terms[2].max()))
            self.emax_max = max(self.emax_max, float(terms[3].max()))
            self.sq[at: at + codes.shape[0]] = row_sq_norms(vectors[start:start + 4096])
        self.n += k

    @property
    def nbytes(self) -> int:
        return self.codes_t.nbytes + 5 * self.a.nbytes + self.a32.nbytes

    def dots(self, query: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 ``û·c`` for every slot (or for `rows`), reading only the columns `query` needs."""
        n = self.n
        nz = query.nonzero()[0]
        if nz.size == 0:
            return np.zeros(n if rows is None else rows.size, np.float32)
        sparse = nz.size * SPARSE_FRACTION <= self.dim
        if rows is not None:
            if sparse:
                return query[nz] @ self.codes_t[np.ix_(nz, rows)].astype(np.float32)
            return query @ self.codes_t[:, rows].astype(np.float32)
        if sparse:
            return query[nz] @ self.codes_t[nz, :n].astype(np.float32)
        out = np.empty(n, np.float32)
        buf = np.empty((self.dim, BLOCK), np.float32)
        for start in range(0, n, BLOCK):
            stop = min(n, start + BLOCK)
            b = buf[:, : stop - start]
            np.copyto(b, self.codes_t[:, start:stop], casting="unsafe")
            np.matmul(query, b, out=out[start:stop])
        return out

    def upper_bounds(self, query: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """A float64 upper bound on the exact cosine of `query` with every slot's row.

        With `rows` (slot numbers), bounds for those slots only; worth it when they are
        a small part of the shard, since the codes are then gathered rather than streamed.
        """
        count = self.n if rows is None else rows.size
        unit = QueryUnit.of(query)
        if unit is None:
            return np.full(count, SLACK)
        dots = self.dots(unit.u32, rows)
        return self.bounds_of(unit, dots, slice(0, self.n) if rows is None else rows)

    def bounds_of(self, unit: QueryUnit, dots: np.ndarray, pick: slice | np.ndarray) -> np.ndarray:
        """The bounds of the slots `pick`, whose float32 dot products with ``û`` are `dots`."""
        a, g, eps, emax = self.a[pick], self.g[pick], self.eps[pick], self.emax[pick]
        residual = np.minimum(unit.norm * eps, unit.l1 * emax)
        return a * dots.astype(np.float64) + unit.norm * g + residual + (unit.delta + SLACK)

    def spread(self, unit: QueryUnit) -> float:
        """How far any row's bound may lie above ``s = fl(fl(a)·D)`` (see the module text)."""
        if self.n == 0:
            return SLACK
        gam = gamma(self.dim)
        rounding = 4.0 * _U32 * (1.0 + gam) * unit.norm * self.g_max / gam + 1e-30
        residual = min(unit.norm * self.eps_max, unit.l1 * self.emax_max)
        return (rounding + unit.norm * self.g_max + residual + unit.delta + SLACK) * (1.0 + 1e-9) + 1e-12


class QueryUnit:
    """The query's terms of the bound: ``û`` (float32), ``‖û‖``, ``‖û‖₁`` and ``‖δ‖``."""

    __slots__ = ("delta", "l1", "norm", "u32")

    def __init__(self, u32: np.ndarray, norm: float, l1: float, delta: float) -> None:
        self.u32, self.norm, self.l1, self.delta = u32, norm, l1, delta

    @classmethod
    def of(cls, query: np.ndarray) -> QueryUnit | None:
        """None for a zero query (every bound is then SLACK)."""
        q64 = np.asarray(query, np.float64)
        norm = math.sqrt(float(q64 @ q64))
        if norm == 0.0:
            return None
        u = q64 / norm
        u32 = u.astype(np.float32)
        d = u - u32.astype(np.float64)
        u32_64 = u32.astype(np.float64)
        return cls(u32, math.sqrt(float(u32_64 @ u32_64)), float(np.abs(u32_64).sum()) * (1.0 + 1e-12),
                   math.sqrt(float(d @ d)))


def bounded_top(values: np.ndarray, depth: int) -> tuple[np.ndarray, float]:
    """Positions of at least `depth` of the highest `values` (every value at or above the
    threshold returned), and that threshold; few more than `depth` as a rule.

    The threshold is read off a strided sample: every ``3·depth/4``-th value, so that
    the sample's 4th highest has about ``3·depth`` values above it. An unlucky sample
    is read again further down (or up); a full selection is made only when that fails
    too."""
    n = values.size
    if n > 64 * depth:
        sample = values[:: max(1, 3 * depth // 4)]
        from_top = 4
        for _ in range(3):
            kth = sample.size - from_top
            threshold = np.partition(sample, kth)[kth]
            above = (values >= threshold).nonzero()[0]
            if above.size < depth and from_top < sample.size:
                from_top = min(sample.size, 4 * from_top)
            elif above.size > 16 * depth and from_top > 1:
                from_top = max(1, from_top // 4)
            elif depth <= above.size <= 16 * depth:
                return above, float(threshold)
            else:
                break
    threshold = np.partition(values, n - depth)[n - depth]
    return (values >= threshold).nonzero()[0], float(threshold)


def _float32_at_most(value: float) -> np.float32:
    """The largest float32 not above `value`."""
    down = np.float32(value)
    if float(down) > value:
        down = np.nextafter(down, np.float32(-np.inf))
    return down


def first_pass(codes: CodeColumns, query: np.ndarray, rows: np.ndarray | None, depth: int,
               exact: Callable[[np.ndarray], np.ndarray],
               floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Slots that may rank in the exact top `depth`, each with its exact cosine.

    `rows` are the slots to rank (ascending; None: every slot); `exact(slots)` gives
    the exact cosines of a subset. Every row whose exact cosine reaches the exact top
    `depth` (and `floor`) is returned, with its exact cosine. A row is
    left out only when its full bound lies below the cut, and that full bound is
    computed only for rows whose ``s`` lies within `CodeColumns.spread` of the cut.
    """
    count = codes.n if rows is None else rows.size
    unit = QueryUnit.of(query)
    if count <= depth or unit is None:
        every = np.arange(count) if rows is None else rows
        return every, exact(every)
    if rows is not None and rows.size * 4 >= codes.n:  # most slots: stream the codes, then pick
        dots = codes.dots(unit.u32)[rows]
    else:
        dots = codes.dots(unit.u32, rows)
    s = (codes.a32[:count] if rows is None else codes.a32[rows]) * dots
    above, threshold = bounded_top(s, depth)
    s_above = s[above]
    split = s_above.argpartition(above.size - depth)  # the last `depth`: the rows of the cut
    top, rest = above[split[above.size - depth:]], split[: above.size - depth]
    top_slots = top if rows is None else rows[top]
    top_scores = exact(top_slots)
    cut = max(float(top_scores.min()), floor)
    reach = _float32_at_most(cut - codes.spread(unit))
    near = above[rest[s_above[rest] >= reach]]
    if float(reach) < threshold:  # rows below the threshold reach the cut too
        near = np.concatenate([near, ((s >= reach) & (s < threshold)).nonzero()[0]])
    if near.size:
        near_slots = near if rows is None else rows[near]
        near_slots = near_slots[codes.bounds_of(unit, dots[near], near_slots) >= cut]
        if near_slots.size:
            return (np.concatenate([top_slots, near_slots]),
                    np.concatenate([top_scores, exact(near_slots)]))
    return top_slots, top_scores
