"""Per-scope BM25 summands on a device, cached until the next write, and an exact top-`depth`.

A query's lexical score is a sum over its terms of one summand per (term, row), and
each summand depends only on the scope (``N``, ``avgdl``, ``df``) and the row
(`ranking`). `ScopeView` computes a term's summands for every row of the scope once,
with exactly the expression `ranking.bm25_rank` uses, and keeps them (bounded) until
the shard changes; a query then only adds them up, term by term in sorted order,
which gives the same float64 sums as the reference scorer.

`top_rows` returns a superset of the rows that rank in the top `depth` without
touching every row of a term (see `_pruned`): a floor from each term's best rows
scored exactly, then only the rows whose summands can still reach it.

A view also keeps, per embedding space, which of its rows hold a vector.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .ranking import K1, W_BODY, W_TITLE, B, ScopeStats

if TYPE_CHECKING:
    from .shard_cache import ShardCache

CACHED_POSTINGS = 1_000_000  # summands kept per scope (12 bytes each, 16 more once sorted)


def idf_of(n_docs: int, df: int) -> float:
    """`ranking.bm25_rank`'s idf, the same float arithmetic."""
    return math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))


def length_norm(len_title: np.ndarray, len_body: np.ndarray, avgdl: float) -> np.ndarray:
    """Per row, ``K1·(1 − b + b·len/avgdl)`` as `ranking.bm25_rank` computes it."""
    return K1 * (1.0 - B + B * (W_TITLE * len_title + W_BODY * len_body) / avgdl)


def summands(idf: float, tf_title: np.ndarray, tf_body: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """One term's BM25 summand per row (0.0 where the row lacks the term), elementwise exactly
    the reference's ``idf·tf·(k1 + 1)/(tf + norm)``."""
    tfw = W_TITLE * tf_title + W_BODY * tf_body
    return idf * tfw * (K1 + 1.0) / (tfw + norm)


def rank_candidates(stats: ScopeStats, keys: Sequence, len_title: np.ndarray, len_body: np.ndarray,
                    tfs: np.ndarray, selected: np.ndarray, depth: int) -> list[tuple]:
    """`ranking.bm25_rank(...)[:depth]` over candidates given as arrays, bit for bit.

    `tfs` is (rows, terms, 2): each candidate's (title, body) counts of each query term,
    in the terms' sorted order; df counts every candidate, scores only `selected` ones.
    """
    if not len(keys):
        return []
    norm = length_norm(len_title, len_body, stats.avgdl)
    scores = np.zeros(len(keys), np.float64)
    for i in range(tfs.shape[1]):
        t, b = tfs[:, i, 0], tfs[:, i, 1]
        df = int(np.count_nonzero((t != 0) | (b != 0)))
        if df:
            scores += summands(idf_of(stats.n_docs, df), t, b, norm)
    found = np.flatnonzero(selected & (scores > 0.0))
    if found.size > depth:
        kth = np.partition(scores[found], found.size - depth)[found.size - depth]
        found = found[scores[found] >= kth]
    ranked = sorted(((keys[i], s) for i, s in zip(found.tolist(), scores[found].tolist())),
                    key=lambda kv: (-kv[1], kv[0]))
    return ranked[:depth]


@dataclass(slots=True)
class TermScores:
    """One term's rows in a scope (ascending slots) and their BM25 summands.

    Its highest summands are kept in order once asked for (a prefix of the rows by
    summand, grown when a query needs more); a question that reaches past that prefix
    is answered by one pass over the summands instead of sorting them all."""

    slots: np.ndarray
    contrib: np.ndarray
    _head: tuple[np.ndarray, np.ndarray] | None = None

    def head(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, negated summands) of the highest summands by summand descending: at
        least `count` of them, or every one when the term has fewer."""
        have = self._head
        size = self.contrib.size
        if have is None or (have[0].size < count and have[0].size < size):
            want = max(count, 256 if have is None else 4 * have[0].size)
            if want * 4 >= size:
                order = np.argsort(-self.contrib, kind="stable")
            else:
                part = np.argpartition(-self.contrib, want - 1)[:want]
                order = part[np.argsort(-self.contrib[part], kind="stable")]
            have = self._head = (order, -self.contrib[order])
        return have

    def at_least(self, value: float) -> np.ndarray:
        """Positions of the summands that are >= value (in no promised order)."""
        order, neg = self.head(1)
        count = int(neg.searchsorted(-value, side="right"))
        if count < order.size or order.size == self.contrib.size:
            return order[:count]
        return (self.contrib >= value).nonzero()[0]

    def lookup(self, slots: np.ndarray) -> np.ndarray:
        """The summand of each of `slots` (ascending), 0.0 where the row lacks the term."""
        if self.slots.size == 0:
            return np.zeros(slots.size, np.float64)
        pos = self.slots.searchsorted(slots)
        pos[pos == self.slots.size] = 0
        return np.where(self.slots[pos] == slots, self.contrib[pos], 0.0)


class ScopeView:
    """A scope's mask and statistics, and its terms' summands, valid for one cache state."""

    def __init__(self, cache: ShardCache, partitions: Sequence[str] | None) -> None:
        self.cache = cache
        self.mask = cache.scope_mask(partitions)
        self.stats: ScopeStats = cache.stats(self.mask)
        self._every_slot = self.stats.n_docs == len(cache.keys)  # the mask is all True
        self._norm: np.ndarray | None = None  # each slot's `length_norm`, once a term asks
        self._terms: OrderedDict[str, TermScores] = OrderedDict()
        self._held = 0
        self._vector_rows: dict[str, np.ndarray | None] = {}

    def vector_rows(self, space: str) -> np.ndarray | None:
        """The scope's slots holding a vector in `space` (ascending), or None when that is
        every slot of the cache."""
        if space not in self._vector_rows:
            rows = np.flatnonzero(self.mask & self.cache.has_vector[space].view)
            self._vector_rows[space] = None if rows.size == len(self.cache.keys) else rows.astype(np.int32)
        return self._vector_rows[space]

    def term(self, term: str) -> TermScores:
        found = self._terms.get(term)
        if found is not None:
            self._terms.move_to_end(term)
            return found
        cache, stats = self.cache, self.stats
        slots, tf = cache.postings(term)
        if not self._every_slot:
            keep = self.mask[slots]
            slots, tf = slots[keep], tf[keep]
        df = slots.size
        if df:
            if self._norm is None:  # elementwise: a row's value is the same computed alone
                self._norm = length_norm(cache.len_title.view, cache.len_body.view, stats.avgdl)
            contrib = summands(idf_of(stats.n_docs, df), tf[:, 0], tf[:, 1], self._norm[slots])
        else:
            contrib = np.zeros(0, np.float64)
        found = TermScores(slots, contrib)
        self._terms[term] = found
        self._held += df
        while self._held > CACHED_POSTINGS and len(self._terms) > 1:
            _, old = self._terms.popitem(last=False)
            self._held -= old.slots.size
        return found

    def top_rows(self, terms: Sequence[str], selected: np.ndarray | None,
                 depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(slots, scores) of scoring rows, a superset of the top `depth` by BM25.

        `terms` are sorted; `selected` is the filter mask, or None when every row of the
        scope is selected. Scores are bit-identical to `ranking.bm25_rank`'s.
        """
        entries = [self.term(t) for t in terms]
        if selected is not None:
            entries = [_subset(e, selected) for e in entries]
        present = [e for e in entries if e.slots.size]
        if not present:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        if len(present) == 1 and selected is None:
            return _head(present[0], depth)
        n_slots = len(self.cache.keys)
        if selected is None and sum(e.slots.size for e in present) * 8 > n_slots:
            found = _pruned(entries, present, depth, n_slots)
            if found is not None:
                return found
        return _dense(entries, n_slots)  # few postings: adding them all up is cheapest


def _union(parts: list[np.ndarray], n_slots: int) -> np.ndarray:
    """The sorted union of slot arrays (each unique)."""
    if len(parts) == 1:
        return np.sort(parts[0])
    total = sum(p.size for p in parts)
    if total * 16 < n_slots:
        merged = np.concatenate(parts)
        merged.sort()
        keep = np.empty(merged.size, bool)
        keep[:1] = True
        np.not_equal(merged[1:], merged[:-1], out=keep[1:])
        return merged[keep]
    mark = np.zeros(n_slots, bool)
    for p in parts:
        mark[p] = True
    return mark.nonzero()[0]


def _without(rows: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """`rows` not in `taken` (both ascending, unique)."""
    if taken.size == 0 or rows.size == 0:
        return rows
    pos = taken.searchsorted(rows)
    np.minimum(pos, taken.size - 1, out=pos)
    return rows[taken[pos] != rows]


def _subset(e: TermScores, selected: np.ndarray) -> TermScores:
    keep = selected[e.slots]
    return TermScores(e.slots[keep], e.contrib[keep])


def _head(e: TermScores, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """A single term: its rows whose summand reaches the depth-th best (ties kept)."""
    if e.slots.size <= depth:
        keep = e.contrib > 0.0
        return e.slots[keep], e.contrib[keep]
    _, neg = e.head(depth)
    pos = e.at_least(-float(neg[depth - 1]))
    pos = pos[e.contrib[pos] > 0.0]
    return e.slots[pos], e.contrib[pos]


def _sum(entries: list[TermScores], slots: np.ndarray) -> np.ndarray:
    """The BM25 score of `slots` (ascending): summands added in term order, as the reference does."""
    scores = entries[0].lookup(slots)  # 0.0 + x is x: the reference's sum from 0.0
    for e in entries[1:]:
        scores += e.lookup(slots)
    return scores


def _pruned(entries: list[TermScores], present: list[TermScores], depth: int,
            n_slots: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Score only the rows that can reach the top `depth`; None when that would not pay.

    Seeds: the `depth` best rows of every term (every row of a term with no more).
    Their `depth`-th best score is a floor for the final top `depth`. A row outside the
    seeds has, in each term, a summand no higher than that term's `depth`-th best
    (``v``; 0 for a term whose rows are all seeds). So when the ``v`` sum below the
    floor, the seeds hold the top `depth`. Otherwise such a row must reach, in some
    term, the floor minus the other terms' ``v`` (when that is positive), or
    ``floor / m`` in one of its (at most ``m``) terms; the smaller of the sets these
    rules name, read off the terms' rows by summand, is scored with the seeds.
    """
    largest = max(e.slots.size for e in present)
    parts, caps = [], []
    for e in present:
        if e.slots.size <= depth:
            parts.append(e.slots)
            caps.append(0.0)
        else:
            order, neg = e.head(depth)
            parts.append(e.slots[order[:depth]])
            caps.append(-float(neg[depth - 1]))
    seeds = _union(parts, n_slots)
    scores = _sum(entries, seeds)
    total = sum(caps)
    if total == 0.0:  # the seeds are every row holding a term
        keep = scores > 0.0
        return seeds[keep], scores[keep]
    positive = scores[scores > 0.0]
    if positive.size < depth:
        return None
    floor = float(np.partition(positive, positive.size - depth)[positive.size - depth])
    if total * (1.0 + 1e-9) < floor:  # the margins cover rounding in the sums
        keep = scores > 0.0
        return seeds[keep], scores[keep]
    open_terms = [(e, cap) for e, cap in zip(present, caps) if cap > 0.0]
    reach = floor / len(open_terms) * (1.0 - 1e-12)
    extra = [e.slots[e.at_least(reach)] for e, _ in open_terms]
    for e, cap in open_terms:
        others = total - cap
        need = floor - others - 1e-9 * (floor + others)
        if need > 0:
            rows = e.at_least(need)
            if rows.size < sum(x.size for x in extra):
                extra = [e.slots[rows]]
    if (seeds.size + sum(x.size for x in extra)) * 4 > largest * len(extra):
        return None  # rows the sets share count once per set here: bail out before the union
    added = _without(_union(extra, n_slots), seeds)
    if (seeds.size + added.size) * 4 > largest:
        return None
    if added.size:
        seeds, scores = np.concatenate([seeds, added]), np.concatenate([scores, _sum(entries, added)])
    keep = scores > 0.0
    return seeds[keep], scores[keep]


def _dense(entries: list[TermScores], n_slots: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Every scoring row: summands scattered into one array, term by term."""
    if n_slots is None:
        n_slots = int(max(int(e.slots[-1]) for e in entries if e.slots.size)) + 1
    scores = np.zeros(n_slots, np.float64)
    hit = np.zeros(n_slots, bool)
    for e in entries:
        scores[e.slots] += e.contrib
        hit[e.slots] = True
    found = np.flatnonzero(hit & (scores > 0.0))
    return found, scores[found]
