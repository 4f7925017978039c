"""`SearchIndex`: the public face of the index — prepare and write documents, run hybrid queries.

Writing analyses each document once (`analysis`) and embeds it in each of its spaces
in one batch per space; a failed embedding leaves the row lexical-only and marks the
space pending. Searching asks the backend for candidates and ranks them with
`ranking`, so every backend returns the same ordered results for the same rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import ranking
from .analysis import analyze_doc, query_terms
from .backend import Backend, Filters, PreparedDoc, Scope, check_vector
from .doc import IndexDoc, SearchResult, SearchResults, check_identifier
from .embedding import Embedder
from .errors import ConfigurationError, ScopeError, UnknownSpaceError, ValidationError

log = logging.getLogger(__name__)

MIN_DEPTH = 50


def channel_depth(k: int) -> int:
    """How many rows each channel ranks before fusion."""
    return max(MIN_DEPTH, 5 * k)


class SearchIndex:
    """Hybrid search over one backend, with one embedder per embedding space."""

    def __init__(self, backend: Backend, embedders: Mapping[str, Embedder] | Embedder | None = None,
                 *, default_space: str | None = None) -> None:
        if embedders is not None and not isinstance(embedders, Mapping):
            if len(backend.spaces) != 1:
                raise ConfigurationError(
                    "pass embedders as {space: embedder} when the backend has several spaces"
                )
            embedders = {next(iter(backend.spaces)): embedders}
        self.backend = backend
        self.embedders: dict[str, Embedder] = dict(embedders or {})
        unknown = sorted(set(self.embedders) - set(backend.spaces))
        if unknown:
            raise ConfigurationError(
                f"embedders for space(s) {unknown} that the backend does not define; give the "
                f"backend matching spaces (it has {sorted(backend.spaces)})"
            )
        for space, embedder in self.embedders.items():
            if embedder.dim != backend.spaces[space]:
                raise ConfigurationError(
                    f"embedder for space {space!r} emits {embedder.dim}-d vectors but the space is "
                    f"{backend.spaces[space]}-d"
                )
        if default_space is None and len(backend.spaces) == 1:
            default_space = next(iter(backend.spaces))
        if default_space is not None and default_space not in backend.spaces:
            raise UnknownSpaceError(f"default_space {default_space!r} is not one of {sorted(backend.spaces)}")
        self.default_space = default_space

    # -- writing --------------------------------------------------------------------------

    def prepare(self, docs: Sequence[IndexDoc],
                vectors: Mapping[int, Mapping[str, Any]] | None = None) -> list[PreparedDoc]:
        """Analyse and embed `docs` (batched per space). Never writes.

        `vectors` may give precomputed vectors by position in `docs`; those are checked
        and not re-embedded. An embedder that raises leaves those rows pending.
        """
        for doc in docs:
            if not isinstance(doc, IndexDoc):
                raise ValidationError(f"expected IndexDoc, got {type(doc).__name__}")
            for space in doc.embed_spaces or ():
                if space not in self.backend.spaces:
                    raise UnknownSpaceError(
                        f"{doc.key} names embedding space {space!r}; the backend defines "
                        f"{sorted(self.backend.spaces)}"
                    )
        given = vectors or {}
        per_doc: list[dict[str, np.ndarray | None]] = [{} for _ in docs]
        pending: list[list[str]] = [[] for _ in docs]
        for space in self.backend.spaces:
            wanted = [i for i, d in enumerate(docs) if d.embed_spaces is None or space in d.embed_spaces]
            todo = []
            for i in wanted:
                if space in given.get(i, {}):
                    per_doc[i][space] = _nonzero(check_vector(space, self.backend.spaces, given[i][space]))
                else:
                    todo.append(i)
            embedder = self.embedders.get(space)
            if embedder is None or not todo:
                continue
            texts = [docs[i].embed_text() for i in todo]
            try:
                out = np.asarray(embedder.embed(texts), dtype=np.float32)
                if out.shape != (len(todo), self.backend.spaces[space]):
                    raise ValidationError(f"embedder for {space!r} returned shape {out.shape}")
            except ValidationError:
                raise
            except Exception as exc:  # an outage must not stop writes: rows stay lexical-only
                log.warning("embedding failed for space %s (%d rows pending): %s", space, len(todo), exc)
                for i in todo:
                    pending[i].append(space)
                continue
            for row, i in enumerate(todo):
                per_doc[i][space] = _nonzero(check_vector(space, self.backend.spaces, out[row]))
        return [
            PreparedDoc(doc=d, lexical=analyze_doc(d), vectors=per_doc[i], pending=tuple(pending[i]))
            for i, d in enumerate(docs)
        ]

    def upsert(self, doc: IndexDoc) -> None:
        self.upsert_many([doc])

    def upsert_many(self, docs: Iterable[IndexDoc]) -> int:
        """Write a batch in one transaction; returns how many rows were written."""
        batch = list(docs)
        keys = [d.key for d in batch if isinstance(d, IndexDoc)]
        if len(set(keys)) != len(keys):
            raise ValidationError("a batch names the same (object_type, object_id, node_kind) twice")
        prepared = self.prepare(batch)
        self.backend.write(prepared)
        return len(prepared)

    def delete(self, object_type: str, object_id: str, node_kind: str | None = None) -> int:
        """Tombstone an object's rows (or one node kind of it); returns how many."""
        if not isinstance(object_type, str) or not isinstance(object_id, str):
            raise ValidationError("object_type and object_id must be strings")
        return self.backend.delete(object_type, object_id, node_kind)

    # -- searching ------------------------------------------------------------------------

    def search(
        self, query: str, *, k: int = 10, space: str | None = None,
        partition: str | Sequence[str] | None = None, all_partitions: bool = False,
        object_types: Sequence[str] | None = None, node_kinds: Sequence[str] | None = None,
        attrs: Mapping[str, Any] | None = None, mode: str = "balanced",
        min_semantic_score: float | None = None, collapse: bool = True,
        diversity_key: str | None = None, diversity_cap: int | None = None,
        query_vector: Any = None,
    ) -> SearchResults:
        """Hybrid search. See `ranking` for exactly how rows are scored and fused."""
        if not isinstance(query, str):
            raise ValidationError("query must be a string")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValidationError(f"k must be a positive integer, got {k!r}")
        ranking.check_mode(mode)
        if partition is None and not all_partitions and self.backend.requires_scope:
            raise ScopeError(
                "a server search must state its scope: pass partition='…' (or a list), "
                "or all_partitions=True to search every tenant"
            )
        scope = Scope.of(partition, all_partitions)
        filters = Filters.of(object_types, node_kinds, attrs)
        if diversity_key is not None:
            if diversity_key not in ("object_type", "node_kind"):
                check_identifier(diversity_key, "diversity_key")
            if not isinstance(diversity_cap, int) or diversity_cap < 1:
                raise ValidationError("diversity_key needs diversity_cap, a positive integer")
        space = space or self.default_space
        if space is not None and space not in self.backend.spaces:
            raise UnknownSpaceError(f"unknown space {space!r}; the backend defines {sorted(self.backend.spaces)}")
        if not query.strip() and query_vector is None:
            return SearchResults()

        depth = channel_depth(k)
        terms = query_terms(query)
        qvec = self._query_vector(space, query, query_vector)
        found = self.backend.retrieve(terms, space, qvec, scope, filters, depth)
        stats, lexical, approximate = found.stats, found.lexical, found.approximate
        semantic: list[tuple[Any, float]] = []
        if qvec is not None:
            semantic = ranking.semantic_rank(found.semantic_keys, found.semantic_vectors, qvec,
                                             depth=depth, min_score=min_semantic_score)

        fused = ranking.fuse(lexical, semantic, mode=mode, depth=depth)
        group_of = None
        if diversity_key is not None:
            attrs_by_key = {}
            if diversity_key not in ("object_type", "node_kind"):
                attrs_by_key = {key: row["attrs"] for key, row in
                                self.backend.fetch([f.key for f in fused]).items()}
            group_of = ranking.group_lookup(attrs_by_key, diversity_key)
        chosen = ranking.collapse_and_cap(fused, collapse=collapse, group_of=group_of,
                                          cap=diversity_cap, k=k)
        rows = self.backend.fetch([f.key for f, _ in chosen])
        results = []
        for f, kinds in chosen:
            row = rows.get(f.key)
            if row is None:  # deleted between the channel queries and this fetch
                continue
            results.append(SearchResult(
                object_type=f.key[0], object_id=f.key[1], node_kind=f.key[2],
                partition=row["partition"], title=row["title"], payload=row["payload"],
                attrs=row["attrs"], score=f.score, match_type=f.match_type,
                lexical_rank=f.lexical_rank, semantic_rank=f.semantic_rank,
                lexical_score=f.lexical_score, semantic_score=f.semantic_score,
                matched_node_kinds=kinds,
            ))
        return SearchResults(results, approximate=approximate, scope_size=stats.n_docs)

    def _query_vector(self, space: str | None, query: str, given: Any) -> np.ndarray | None:
        if space is None:
            return None
        if given is not None:
            vec = check_vector(space, self.backend.spaces, given)
        else:
            embedder = self.embedders.get(space)
            if embedder is None:
                return None
            try:
                vec = check_vector(space, self.backend.spaces, np.asarray(embedder.embed([query]))[0])
            except ValidationError:
                raise
            except Exception as exc:  # the lexical channel still answers
                log.warning("query embedding failed for space %s: %s", space, exc)
                return None
        return _nonzero(vec)


def _nonzero(vec: np.ndarray) -> np.ndarray | None:
    """Zero vectors have no direction: they are stored and queried as 'no vector'."""
    return vec if np.any(vec) else None
