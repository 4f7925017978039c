"""The contract between `SearchIndex` and a storage backend, and the values that cross it.

A backend stores prepared rows and answers: how big is this scope, which rows rank
first for these terms, which rows are nearest this vector, and what a handful of
rows look like. Scores follow `ranking` exactly, whichever way a backend computes
them (the reference scorer over candidates, or its vectorised twin).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .analysis import LexicalFields
from .doc import DocKey, IndexDoc, check_filter_value, check_identifier
from .errors import DimensionMismatchError, UnknownSpaceError, ValidationError
from .ranking import ScopeStats


@dataclass(frozen=True, slots=True)
class PreparedDoc:
    """A document ready to store: analysed terms and one vector (or None) per space.

    `pending` lists the spaces whose embedding failed; the row is lexical-only there
    until a later pass fills the vector in, and `error` says why. `hashes` holds, per
    space, the hash of the text embedded there; `keep` the spaces whose stored vector
    stays (the text is unchanged, so nothing was sent). `unchanged` marks a row whose
    stored version already shows exactly this (`fingerprint`): it is not written.
    """

    doc: IndexDoc
    lexical: LexicalFields
    vectors: Mapping[str, np.ndarray | None]
    pending: tuple[str, ...] = ()
    hashes: Mapping[str, str] = field(default_factory=dict)
    keep: tuple[str, ...] = ()
    fingerprint: str | None = None
    unchanged: bool = False
    error: str | None = None

    def stored(self) -> StoredRow:
        """What the search table holds for this row once it is written."""
        return StoredRow(self.fingerprint, dict(self.hashes), self.pending, deleted=False)


@dataclass(frozen=True, slots=True)
class StoredRow:
    """What a backend holds of a row, as far as re-embedding and no-op updates care:
    its fingerprint, per-space text hashes, pending spaces, and whether it is a tombstone."""

    fingerprint: str | None
    hashes: Mapping[str, str]
    pending: tuple[str, ...]
    deleted: bool

    @classmethod
    def tombstone(cls) -> StoredRow:
        return cls(None, {}, (), deleted=True)


@dataclass(frozen=True, slots=True)
class Scope:
    """Which partitions a query reads: `partitions`, or every partition when it is None."""

    partitions: tuple[str, ...] | None

    @classmethod
    def of(cls, partition: str | Sequence[str] | None, all_partitions: bool) -> Scope:
        if partition is not None and all_partitions:
            raise ValidationError("give either partition= or all_partitions=True, not both")
        if partition is None:
            return cls(None)
        parts = (partition,) if isinstance(partition, str) else tuple(partition)
        if not parts or not all(isinstance(p, str) and p for p in parts):
            raise ValidationError("partition must be a non-empty string or a non-empty list of them")
        return cls(tuple(sorted(set(parts))))


@dataclass(frozen=True, slots=True)
class Filters:
    """Row filters: object types, node kinds and attrs containment (scalar values only)."""

    object_types: tuple[str, ...] | None = None
    node_kinds: tuple[str, ...] | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, object_types: Sequence[str] | None, node_kinds: Sequence[str] | None,
           attrs: Mapping[str, Any] | None) -> Filters:
        def names(value: Sequence[str] | None, what: str) -> tuple[str, ...] | None:
            if value is None:
                return None
            if isinstance(value, str):
                value = [value]
            if not all(isinstance(v, str) for v in value):
                raise ValidationError(f"{what} must be strings")
            return tuple(sorted(set(value)))

        checked: dict[str, Any] = {}
        for key, value in (attrs or {}).items():
            checked[check_identifier(key, "attrs filter key")] = check_filter_value(key, value)
        return cls(names(object_types, "object_types"), names(node_kinds, "node_kinds"), checked)


def check_vector(space: str, dims: Mapping[str, int], vector: object) -> np.ndarray:
    """A float32 vector for `space`, or a typed error naming what is wrong."""
    if space not in dims:
        raise UnknownSpaceError(
            f"unknown embedding space {space!r}; the backend defines {sorted(dims) or 'no spaces'}"
        )
    arr = np.asarray(vector, dtype=np.float32)
    if arr.ndim != 1:
        raise ValidationError(f"a vector for space {space!r} must be one-dimensional")
    if arr.shape[0] != dims[space]:
        raise DimensionMismatchError(space, dims[space], int(arr.shape[0]))
    if not np.all(np.isfinite(arr)):
        raise ValidationError(f"a vector for space {space!r} has NaN or infinite components")
    return arr


@dataclass(frozen=True, slots=True)
class Retrieved:
    """What a backend finds for one query: the scope's statistics, the lexical top rows
    already scored (`ranking.bm25_rank`'s order and scores, exactly), and the semantic
    candidates with their vectors, to be scored by `ranking.semantic_rank`. A backend
    that already computed the candidates' exact cosines (`ranking.exact_cosine`, row by
    row) passes them as `semantic_scores`, so they are not computed twice. A backend that
    answered from a consistent copy of the scope gives `fetch`, which reads the result
    rows from that same copy."""

    stats: ScopeStats
    lexical: list[tuple[DocKey, float]]
    semantic_keys: list[DocKey]
    semantic_vectors: np.ndarray
    approximate: bool
    semantic_scores: np.ndarray | None = None
    fetch: Callable[[Sequence[DocKey]], dict[DocKey, dict[str, Any]]] | None = None


class Backend(Protocol):
    """What `SearchIndex` needs from storage. Both backends implement it."""

    spaces: Mapping[str, int]
    requires_scope: bool

    def write(self, docs: Sequence[PreparedDoc]) -> None: ...

    def delete(self, object_type: str, object_id: str, node_kind: str | None) -> int: ...

    def retrieve(self, terms: Sequence[str], space: str | None, query: np.ndarray | None,
                 scope: Scope, filters: Filters, depth: int) -> Retrieved: ...

    def fetch(self, keys: Sequence[DocKey]) -> dict[DocKey, dict[str, Any]]: ...
