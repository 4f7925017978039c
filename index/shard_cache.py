"""In-memory search structures over a SQLite shard's live rows, kept in step with its writes.

A device answers a query with NumPy, not with a row-at-a-time scan: rows live in
*slots* (growable column arrays), term frequencies in an inverted index (a sorted
base plus a small delta that is merged when it grows), and each embedding space in
one float32 matrix with a row per slot plus its int8 codes (`quantize`). Per-scope
BM25 summands, and each space's rows with a vector, live in `ScopeView`s, dropped on
any change. Writes made through the owning backend are
applied incrementally; a change made by another connection (the shard's generation
moved) makes the backend reload the whole cache.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .doc import DocKey
from .quantize import CodeColumns, first_pass
from .ranking import ScopeStats, cosine_of_rows
from .scope_view import ScopeView


@dataclass(frozen=True, slots=True)
class CachedRow:
    """What the cache needs of one live row."""

    doc_id: int
    key: DocKey
    partition: str
    len_title: int
    len_body: int
    tf: Mapping[str, tuple[int, int]]
    vectors: Mapping[str, np.ndarray]
    # What a result shows of the row: partition, title, and payload and attrs as the JSON
    # text the shard stores (parsed only for the rows a query returns).
    shown: tuple[str, str, str, str] | None = None


class _Column:
    """A growable NumPy column (capacity doubling)."""

    def __init__(self, dtype, width: int = 0) -> None:
        self.width = width
        shape = (16, width) if width else (16,)
        self.data = np.zeros(shape, dtype=dtype)
        self.n = 0

    def append(self, value) -> None:
        if self.n == self.data.shape[0]:
            grown = np.zeros((self.n * 2, *self.data.shape[1:]), dtype=self.data.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n] = value
        self.n += 1

    @property
    def view(self) -> np.ndarray:
        return self.data[: self.n]

    def trim(self) -> None:
        """Drop the spare capacity (after a bulk load)."""
        self.data = self.data[: max(self.n, 1)].copy()


class ShardCache:
    """Slots, postings and per-space matrices for the live rows of one shard."""

    MERGE_MIN = 20_000
    MAX_VIEWS = 8

    def __init__(self, dims: Mapping[str, int], generation: int) -> None:
        self.generation = generation
        self.dims = dict(dims)
        self.keys: list[DocKey] = []
        self.slot_of: dict[int, int] = {}  # doc_id -> live slot
        self.shown: dict[int, tuple[str, str, str, str]] = {}  # doc_id -> CachedRow.shown, if given
        self.doc_ids = _Column(np.int64)
        self.alive = _Column(np.bool_)
        self.len_title = _Column(np.int32)
        self.len_body = _Column(np.int32)
        # Labels as small integer codes, so scope and filter masks are integer compares.
        self._codes: dict[str, dict[str, int]] = {"partition": {}, "object_type": {}, "node_kind": {}}
        self._labels = {name: _Column(np.int32) for name in self._codes}
        self.vectors = {s: _Column(np.float32, d) for s, d in self.dims.items()}
        self.has_vector = {s: _Column(np.bool_) for s in self.dims}
        # int8 codes of the same vectors, for the semantic first pass (`quantize`).
        self.codes = {s: CodeColumns(d) for s, d in self.dims.items()}
        # Inverted index: term -> (start, end) in the sorted base arrays, plus a delta.
        self.term_ids: dict[str, int] = {}
        self.base_terms = np.zeros(0, np.int32)
        self.base_slots = np.zeros(0, np.int32)
        self.base_tf = np.zeros((0, 2), np.int32)
        self.base_range: dict[int, tuple[int, int]] = {}
        self.delta: dict[int, tuple[list[int], list[int], list[int]]] = {}
        self.delta_size = 0
        self._views: dict[tuple[str, ...] | None, ScopeView] = {}  # dropped on every change

    @classmethod
    def of_rows(cls, dims: Mapping[str, int], rows: Iterable[tuple]) -> ShardCache:
        """A cache of `rows`, each (doc_id, key, partition, len_title, len_body, tf, vectors):
        labels share one string object per distinct value, postings are merged, spare
        capacity released."""
        labels: dict[str, str] = {}
        intern = labels.setdefault
        cache = cls(dims, 0)
        cache.add(CachedRow(doc_id, (intern(t, t), i, intern(n, n)), intern(p, p), lt, lb, tf, vecs)
                  for doc_id, (t, i, n), p, lt, lb, tf, vecs in rows)
        cache.merge()
        cache.trim()
        return cache

    @classmethod
    def of_arrays(cls, dims: Mapping[str, int], doc_ids: Sequence[int], keys: Sequence[DocKey],
                  partitions: Sequence[str], len_title: Sequence[int], len_body: Sequence[int],
                  terms: Sequence[str],
                  postings: tuple[Sequence[int], Sequence[int], Sequence[int], Sequence[int]],
                  vectors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> ShardCache:
        """A cache built column by column, as `add` + `merge` would build it from the same rows.

        Rows are given by position (`doc_ids` ascending); `postings` is (doc_id, term
        number in `terms`, title tf, body tf) per (row, term); `vectors[space]` is
        (float32 matrix, has-vector mask), zero rows where a row has none."""
        cache = cls(dims, 0)
        n = len(doc_ids)
        ids = np.asarray(doc_ids, np.int64)
        labels: dict[str, str] = {}
        intern = labels.setdefault
        cache.keys = [(intern(t, t), i, intern(k, k)) for t, i, k in keys]
        cache.slot_of = dict(zip(ids.tolist(), range(n)))
        for column, values, dtype in ((cache.doc_ids, ids, np.int64), (cache.alive, np.ones(n, bool), np.bool_),
                                      (cache.len_title, len_title, np.int32),
                                      (cache.len_body, len_body, np.int32)):
            column.data, column.n = np.asarray(values, dtype).reshape(n), n
        for name, values in (("partition", partitions), ("object_type", [k[0] for k in cache.keys]),
                             ("node_kind", [k[2] for k in cache.keys])):
            codes = cache._codes[name]
            column = cache._labels[name]
            column.data = np.fromiter((codes.setdefault(v, len(codes)) for v in values), np.int32, n)
            column.n = n
        for space in cache.dims:
            matrix, has = vectors[space]
            cache.vectors[space].data, cache.vectors[space].n = np.ascontiguousarray(matrix, np.float32), n
            cache.has_vector[space].data, cache.has_vector[space].n = np.asarray(has, bool), n
            cache.codes[space].extend(matrix)
            cache.codes[space].trim()
        post_ids, post_terms, post_t, post_b = postings
        cache.term_ids = dict(zip(terms, range(len(terms))))
        tids = np.asarray(post_terms, np.int32).reshape(-1)
        slots = np.searchsorted(ids, np.asarray(post_ids, np.int64)).astype(np.int32)
        tf = np.column_stack([np.asarray(post_t, np.int32), np.asarray(post_b, np.int32)]).reshape(-1, 2)
        cache.base_terms, cache.base_slots, cache.base_tf = tids, slots, tf
        cache.merge()  # sorts the postings by (term, slot) and indexes each term's range
        return cache

    # -- maintenance ----------------------------------------------------------------------

    def add(self, rows: Iterable[CachedRow]) -> None:
        self._views.clear()
        first = len(self.keys)
        for row in rows:
            self.remove([row.doc_id])
            slot = len(self.keys)
            self.keys.append(row.key)
            self.slot_of[row.doc_id] = slot
            if row.shown is not None:
                self.shown[row.doc_id] = row.shown
            self.doc_ids.append(row.doc_id)
            self.alive.append(True)
            self.len_title.append(row.len_title)
            self.len_body.append(row.len_body)
            for name, value in (("partition", row.partition), ("object_type", row.key[0]),
                                ("node_kind", row.key[2])):
                codes = self._codes[name]
                self._labels[name].append(codes.setdefault(value, len(codes)))
            for space in self.dims:
                vec = row.vectors.get(space)
                ok = vec is not None
                self.vectors[space].append(vec if ok else 0.0)
                self.has_vector[space].append(ok)
            for term, (t, b) in row.tf.items():
                tid = self.term_ids.setdefault(term, len(self.term_ids))
                entry = self.delta.setdefault(tid, ([], [], []))
                entry[0].append(slot)
                entry[1].append(t)
                entry[2].append(b)
                self.delta_size += 1
        for space, codes in self.codes.items():
            codes.extend(self.vectors[space].view[first:])
        if self.delta_size > max(self.MERGE_MIN, self.base_slots.size // 4):
            self.merge()

    def remove(self, doc_ids: Iterable[int]) -> None:
        self._views.clear()
        for doc_id in doc_ids:
            slot = self.slot_of.pop(doc_id, None)
            self.shown.pop(doc_id, None)
            if slot is not None:
                self.alive.data[slot] = False

    def merge(self) -> None:
        """Fold the delta into the sorted base, dropping dead slots' postings."""
        terms = [self.base_terms]
        slots = [self.base_slots]
        tfs = [self.base_tf]
        for tid, (s, t, b) in self.delta.items():
            terms.append(np.full(len(s), tid, np.int32))
            slots.append(np.asarray(s, np.int32))
            tfs.append(np.column_stack([np.asarray(t, np.int32), np.asarray(b, np.int32)]))
        all_terms, all_slots = np.concatenate(terms), np.concatenate(slots)
        all_tf = np.concatenate(tfs) if tfs else np.zeros((0, 2), np.int32)
        keep = self.alive.view[all_slots] if all_slots.size else np.zeros(0, bool)
        all_terms, all_slots, all_tf = all_terms[keep], all_slots[keep], all_tf[keep]
        order = np.lexsort((all_slots, all_terms))
        self.base_terms, self.base_slots, self.base_tf = all_terms[order], all_slots[order], all_tf[order]
        bounds = np.flatnonzero(np.diff(self.base_terms)) + 1
        starts = np.concatenate([[0], bounds]) if self.base_terms.size else np.zeros(0, np.int32)
        ends = np.concatenate([bounds, [self.base_terms.size]]) if self.base_terms.size else starts
        self.base_range = {int(self.base_terms[s]): (int(s), int(e)) for s, e in zip(starts, ends)}
        self.delta, self.delta_size = {}, 0
        self._views.clear()

    # -- queries --------------------------------------------------------------------------

    def one_node_kind(self) -> bool:
        """Whether every row the cache ever held has the same node kind."""
        return len(self._codes["node_kind"]) <= 1

    def label_mask(self, name: str, values: Sequence[str]) -> np.ndarray:
        """Slots whose `name` (partition, object_type or node_kind) is one of `values`."""
        codes = [self._codes[name][v] for v in values if v in self._codes[name]]
        column = self._labels[name].view
        if len(codes) == 1:
            return column == codes[0]
        if len(codes) == len(self._codes[name]):
            return np.ones(column.shape, bool)
        return np.isin(column, codes)

    def scope_mask(self, partitions: Sequence[str] | None) -> np.ndarray:
        mask = self.alive.view.copy()
        if partitions is not None:
            mask &= self.label_mask("partition", partitions)
        return mask

    def stats(self, scope: np.ndarray) -> ScopeStats:
        return ScopeStats(int(scope.sum()), int(self.len_title.view[scope].sum()),
                          int(self.len_body.view[scope].sum()))

    def postings(self, term: str) -> tuple[np.ndarray, np.ndarray]:
        """(slots, tf[:, (title, body)]) of a term, dead slots included."""
        tid = self.term_ids.get(term)
        if tid is None:
            return np.zeros(0, np.int32), np.zeros((0, 2), np.int32)
        parts_s, parts_tf = [], []
        if tid in self.base_range:
            s, e = self.base_range[tid]
            parts_s.append(self.base_slots[s:e])
            parts_tf.append(self.base_tf[s:e])
        if tid in self.delta:
            ds, dt, db = self.delta[tid]
            parts_s.append(np.asarray(ds, np.int32))
            parts_tf.append(np.column_stack([np.asarray(dt, np.int32), np.asarray(db, np.int32)]))
        if not parts_s:
            return np.zeros(0, np.int32), np.zeros((0, 2), np.int32)
        return np.concatenate(parts_s), np.concatenate(parts_tf)

    def trim(self) -> None:
        """Release spare capacity after a bulk load; later appends grow it again."""
        columns = [self.doc_ids, self.alive, self.len_title, self.len_body, *self._labels.values(),
                   *self.vectors.values(), *self.has_vector.values()]
        for column in columns:
            column.trim()
        for codes in self.codes.values():
            codes.trim()

    def scope_view(self, partitions: Sequence[str] | None) -> ScopeView:
        """The scope's mask, statistics and cached BM25 summands (a few scopes are kept)."""
        key = None if partitions is None else tuple(partitions)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= self.MAX_VIEWS:
                self._views.pop(next(iter(self._views)))
            view = self._views[key] = ScopeView(self, partitions)
        return view

    def filter_mask(self, view: ScopeView, object_types: Sequence[str] | None,
                    node_kinds: Sequence[str] | None) -> np.ndarray | None:
        """The scope's rows of the given object types and node kinds (None: no such filter)."""
        if object_types is None and node_kinds is None:
            return None
        selected = view.mask.copy()
        if object_types is not None:
            selected &= self.label_mask("object_type", object_types)
        if node_kinds is not None:
            selected &= self.label_mask("node_kind", node_kinds)
        return selected

    def lexical_top(self, view: ScopeView, selected: np.ndarray | None, terms: Sequence[str],
                    depth: int) -> tuple[list[tuple[DocKey, float]], list[int]]:
        """The lexical top `depth` as `ranking.bm25_rank` ranks it, and the rows' slots.

        `terms` are the query's sorted terms; `selected` the filter mask (None: the scope)."""
        if not terms:
            return [], []
        slots, scores = view.top_rows(terms, selected, depth)
        if slots.size > depth:
            kth = np.partition(scores, slots.size - depth)[slots.size - depth]
            keep = scores >= kth
            slots, scores = slots[keep], scores[keep]
        keys = self.keys
        slot_list = slots.tolist()
        ranked = sorted(zip((-scores).tolist(), map(keys.__getitem__, slot_list), slot_list))[:depth]
        return [(key, -neg) for neg, key, _ in ranked], [slot for _, _, slot in ranked]

    def semantic_top(self, view: ScopeView, selected: np.ndarray | None, space: str,
                     query: np.ndarray, depth: int
                     ) -> tuple[list[DocKey], np.ndarray, np.ndarray, list[int]]:
        """Every row that may rank in the exact top `depth`: keys, vectors, exact cosines, slots.

        A first pass over int8 codes bounds each row's cosine from above (`quantize`);
        the rows whose bound cannot reach the exact top `depth` are dropped unread.
        """
        idx, scores = self.semantic_ids(view, selected, space, query, depth)
        idx_list = idx.tolist()
        return [self.keys[i] for i in idx_list], self.vectors[space].view[idx], scores, idx_list

    def semantic_ids(self, view: ScopeView, selected: np.ndarray | None, space: str,
                     query: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """`semantic_top`'s slots and exact cosines, without keys or vectors."""
        codes = self.codes[space]
        if selected is None:
            rows = view.vector_rows(space)
        else:
            rows = np.flatnonzero(selected & self.has_vector[space].view)
            if rows.size == codes.n:
                rows = None
        if rows is not None and rows.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        q = np.asarray(query, dtype=np.float32)
        return first_pass(codes, q, rows, depth, cosine_of_rows(self.vectors[space].view, q, codes.sq))

    def footprint(self) -> int:
        """Bytes this cache holds or may come to hold: arrays (`nbytes`), the Python objects
        of keys and lookups (measured), and room for the summands its scope views may keep
        (32 bytes per posting)."""
        total = self.nbytes + sys.getsizeof(self.keys) + sys.getsizeof(self.slot_of)
        seen: set[int] = set()
        for key in self.keys:
            total += sys.getsizeof(key)
            for part in key:
                if id(part) not in seen:
                    seen.add(id(part))
                    total += sys.getsizeof(part)
        total += 32 * len(self.slot_of)  # the ints the slot map holds
        if self.shown:
            total += sys.getsizeof(self.shown) + sum(
                sum(map(sys.getsizeof, shown)) for shown in self.shown.values())
        total += sys.getsizeof(self.term_ids) + sum(sys.getsizeof(t) for t in self.term_ids)
        total += sys.getsizeof(self.base_range) + 64 * len(self.base_range)
        total += 32 * (self.base_slots.size + self.delta_size)
        # A scope view's per-row length norms, and its rows with a vector per space.
        total += 8 * len(self.keys) + 4 * len(self.keys) * len(self.dims)
        return total

    @property
    def nbytes(self) -> int:
        """Bytes held in arrays (slots, postings, vectors, codes), without Python objects."""
        total = sum(c.data.nbytes for c in (self.doc_ids, self.alive, self.len_title, self.len_body))
        total += sum(c.data.nbytes for c in self._labels.values())
        total += sum(c.data.nbytes for c in self.vectors.values())
        total += sum(c.data.nbytes for c in self.has_vector.values())
        total += sum(c.nbytes for c in self.codes.values())
        total += self.base_terms.nbytes + self.base_slots.nbytes + self.base_tf.nbytes
        return total
