"""`SearchIndex`: the public face of the index — prepare and write documents, run hybrid queries.

Writing analyses each document once (`analysis`) and embeds it in each of its spaces
in one batch per space, sending only what is new: text whose hash the row already
stores keeps its vector, text the content-hash cache knows comes from there, and a
row identical to its stored version is not written at all. A failed or wrong-shaped
embedding leaves the row lexical-only and marks the space pending, with the error. Searching asks the backend for candidates and ranks them with
`ranking`, so every backend returns the same ordered results for the same rows; a
backend with `search_fused` (a device shard) does all of a query in one call, with
the same ranking written over row numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import ranking
from .analysis import analyze_doc, check_term_bytes, query_terms
from .backend import Backend, Filters, PreparedDoc, Scope, StoredRow, check_vector
from .doc import DocKey, IndexDoc, SearchResult, SearchResults, check_identifier
from .embedding import Embedder, doc_fingerprint, embedder_id, text_hash
from .errors import ConfigurationError, ScopeError, UnknownSpaceError, ValidationError

log = logging.getLogger(__name__)

MIN_DEPTH = 50


def channel_depth(k: int) -> int:
    """How many rows each channel ranks before fusion."""
    return max(MIN_DEPTH, 5 * k)


class SearchIndex:
    """Hybrid search over one backend, with one embedder per embedding space."""

    def __init__(self, backend: Backend, embedders: Mapping[str, Embedder] | Embedder | None = None,
                 *, default_space: str | None = None,
                 observer: Callable[[str, str, int], None] | None = None,
                 check_embedders: bool = True) -> None:
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
        # observer(event, space, n): "reused", "hit", "miss", "failed", "wrong_shape",
        # "noop" (space ""), "pending" (n rows waiting in the space) — the worker's metrics.
        self.observer = observer
        record = getattr(backend, "record_embedders", None)
        if check_embedders and record is not None and self.embedders:
            record({space: embedder_id(e) for space, e in self.embedders.items()})

    # -- writing --------------------------------------------------------------------------

    def prepare(self, docs: Sequence[IndexDoc],
                vectors: Mapping[int, Mapping[str, Any]] | None = None, *,
                known: Mapping[DocKey, StoredRow | None] | None = None,
                stored: Mapping[DocKey, StoredRow | None] | None = None) -> list[PreparedDoc]:
        """Analyse and embed `docs` (batched per space). Never writes the search table.

        `vectors` may give precomputed vectors by position in `docs`; those are checked
        and not re-embedded. Against a backend that keeps per-row state (Postgres), a
        row whose text in a space hashes as stored keeps its vector and sends nothing,
        a text already embedded elsewhere comes from the content-hash cache, and a row
        identical to its stored version is marked `unchanged` (not to be written).
        `known` overrides the stored state for rows written but not yet committed;
        `stored` is the stored state already read by the caller (None: no such row), so
        only the keys it lacks are read.
        An embedder that raises or answers the wrong shape leaves those rows pending.
        """
        for doc in docs:
            if not isinstance(doc, IndexDoc):
                raise ValidationError(f"expected IndexDoc, got {type(doc).__name__}")
            check_term_bytes(doc)
            for space in doc.embed_spaces or ():
                if space not in self.backend.spaces:
                    raise UnknownSpaceError(
                        f"{doc.key} names embedding space {space!r}; the backend defines "
                        f"{sorted(self.backend.spaces)}"
                    )
        given = vectors or {}
        read = stored or {}
        stored = dict(read)
        stored_state = getattr(self.backend, "stored_state", None)
        unread = [d.key for d in docs if d.key not in read]
        if stored_state is not None and unread:
            stored.update(stored_state(unread))
        stored.update(known or {})
        wanted_spaces = [[s for s in self.backend.spaces if d.embed_spaces is None or s in d.embed_spaces]
                         for d in docs]
        fingerprints = [doc_fingerprint(d, wanted_spaces[i]) for i, d in enumerate(docs)]
        unchanged = [False] * len(docs)
        for i, d in enumerate(docs):
            prev = stored.get(d.key)
            if (prev is not None and not prev.deleted and prev.fingerprint == fingerprints[i]
                    and i not in given):
                unchanged[i] = True
        if any(unchanged):
            self._observe("noop", "", sum(unchanged))
        per_doc: list[dict[str, np.ndarray | None]] = [{} for _ in docs]
        pending: list[list[str]] = [[] for _ in docs]
        hashes: list[dict[str, str]] = [{} for _ in docs]
        keep: list[list[str]] = [[] for _ in docs]
        errors: list[str | None] = [None] * len(docs)
        for space in self.backend.spaces:
            todo = []
            embedder = self.embedders.get(space)
            for i, d in enumerate(docs):
                if space not in wanted_spaces[i] or unchanged[i]:
                    continue
                if space in given.get(i, {}):
                    per_doc[i][space] = _nonzero(check_vector(space, self.backend.spaces, given[i][space]))
                    continue
                if embedder is None:
                    continue
                h = hashes[i][space] = text_hash(d.embed_text())
                prev = stored.get(d.key)
                if (prev is not None and not prev.deleted and prev.hashes.get(space) == h
                        and space not in prev.pending):
                    keep[i].append(space)  # same text: the stored vector stays, nothing is sent
                else:
                    todo.append(i)
            kept = sum(space in k for k in keep)
            if kept:
                self._observe("reused", space, kept)
            if not todo:
                continue
            got, error = self.embed_texts(space, [docs[i].embed_text() for i in todo])
            for row, i in enumerate(todo):
                if row in got:
                    per_doc[i][space] = _nonzero(got[row])
                else:
                    pending[i].append(space)
                    errors[i] = f"{space}: {error}"
        return [
            PreparedDoc(doc=d, lexical=analyze_doc(d), vectors=per_doc[i], pending=tuple(pending[i]),
                        hashes=hashes[i], keep=tuple(keep[i]), fingerprint=fingerprints[i],
                        unchanged=unchanged[i], error=errors[i])
            for i, d in enumerate(docs)
        ]

    def embed_texts(self, space: str, texts: Sequence[str]) -> tuple[dict[int, np.ndarray], str | None]:
        """Vectors for `texts` in `space` by position: from the backend's content-hash cache
        when it has them, else from the space's embedder (each distinct text once).

        Positions missing from the result failed; the second value says why. Never raises
        for an embedder's failure or a wrong-shaped answer: rows stay pending instead.
        """
        embedder = self.embedders[space]
        dim = self.backend.spaces[space]
        eid = embedder_id(embedder)
        keys = [text_hash(t) for t in texts]
        unique = dict(zip(keys, texts))
        cache_get = getattr(self.backend, "cache_get", None)
        found: dict[str, np.ndarray] = cache_get(space, eid, list(unique)) if cache_get else {}
        hits = sum(k in found for k in keys)
        if hits:
            self._observe("hit", space, hits)
        missing = [k for k in unique if k not in found]
        error: str | None = None
        if missing:
            self._observe("miss", space, sum(k not in found for k in keys))
            new: dict[str, np.ndarray] = {}
            try:
                out = np.asarray(embedder.embed([unique[k] for k in missing]), dtype=np.float32)
                done = np.ones(len(missing), dtype=bool)
            except Exception as exc:  # noqa: BLE001 - an outage must not stop writes
                out, done = getattr(exc, "vectors", None), getattr(exc, "done", None)
                error = f"{type(exc).__name__}: {exc}"[:1000]
                if not isinstance(out, np.ndarray) or not isinstance(done, np.ndarray):
                    out, done = None, np.zeros(len(missing), dtype=bool)
                self._observe("failed", space, int((~done).sum()))
                log.warning("embedding failed for space %s (%d texts pending): %s",
                            space, int((~done).sum()), exc)
            if out is not None and out.shape != (len(missing), dim):
                error = (f"the embedder for space {space!r} returned shape {out.shape} for "
                         f"{len(missing)} texts, expected ({len(missing)}, {dim})")
                self._observe("wrong_shape", space, len(missing))
                log.warning("%s; the rows stay pending", error)
                out, done = None, np.zeros(len(missing), dtype=bool)
            for j, k in enumerate(missing):
                if out is not None and done[j]:
                    if np.all(np.isfinite(out[j])):
                        new[k] = out[j]
                    else:
                        error = f"the embedder for space {space!r} returned NaN or infinite values"
            if new:
                cache_put = getattr(self.backend, "cache_put", None)
                if cache_put is not None:
                    cache_put(space, eid, new)
                found.update(new)
        return {i: found[k] for i, k in enumerate(keys) if k in found}, error

    def _observe(self, event: str, space: str, n: int) -> None:
        if self.observer is not None and (n or event == "pending"):
            self.observer(event, space, n)

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
        return sum(not p.unchanged for p in prepared)

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
        fused = getattr(self.backend, "search_fused", None)
        if fused is not None and diversity_key in (None, "object_type", "node_kind"):
            group_of = None if diversity_key is None else ranking.group_lookup({}, diversity_key)
            return fused(terms, space, qvec, scope, filters, depth, mode=mode, min_score=min_semantic_score,
                         collapse=collapse, group_of=group_of, cap=diversity_cap, k=k)
        found = self.backend.retrieve(terms, space, qvec, scope, filters, depth)
        stats, lexical, approximate = found.stats, found.lexical, found.approximate
        semantic: list[tuple[Any, float]] = []
        if qvec is not None:
            semantic = ranking.semantic_rank(found.semantic_keys, found.semantic_vectors, qvec,
                                             depth=depth, min_score=min_semantic_score,
                                             scores=found.semantic_scores)

        fetch = found.fetch or self.backend.fetch
        group_of = None
        if diversity_key is not None:
            attrs_by_key = {}
            if diversity_key not in ("object_type", "node_kind"):
                fused_keys = list(dict.fromkeys([key for key, _ in lexical[:depth]]
                                                + [key for key, _ in semantic[:depth]]))
                attrs_by_key = {key: row["attrs"] for key, row in
                                fetch(fused_keys).items()}
            group_of = ranking.group_lookup(attrs_by_key, diversity_key)
        chosen = ranking.fuse_and_collapse(lexical, semantic, mode=mode, depth=depth,
                                           collapse=collapse, group_of=group_of,
                                           cap=diversity_cap, k=k)
        rows = fetch([f.key for f, _ in chosen])
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
            except Exception as exc:  # noqa: BLE001 - outage or wrong shape: lexical still answers
                log.warning("query embedding failed for space %s: %s", space, exc)
                return None
        return _nonzero(vec)


def _nonzero(vec: np.ndarray) -> np.ndarray | None:
    """Zero vectors have no direction: they are stored and queried as 'no vector'."""
    return vec if np.any(vec) else None
