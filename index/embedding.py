"""Embedders: the `Embedder` protocol, `HashingEmbedder` (deterministic, for tests and demos),
and the identities the index records so it never re-embeds what it already has.

An embedder turns texts into float32 vectors of a fixed dimension, in one batch call.
Real deployments plug in a model (a local one, or an HTTP API); the index only needs
`dim` and `embed`. An embedder may also name itself with `embedder_id` (kind, model,
dimension): the index records it per space, keys its content-hash cache by it, and
refuses to mix the vectors of two models in one space.

`text_hash` is the hash of the exact text a row embedded, per space; `doc_fingerprint`
hashes everything a device sees of a row, so an update that changes none of it is
not written at all.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Protocol, runtime_checkable

import numpy as np

from .analysis import analyze
from .errors import ValidationError


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to an (n, dim) float32 array. May raise on outage; the caller decides."""

    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def _code(feature: str, dim: int) -> int:
    """The feature's bucket times two, plus one when its sign is positive."""
    data = feature.encode("utf-8")
    positive = zlib.crc32(data, 0x5BD1E995) & 1  # a second, independent hash
    return (zlib.crc32(data) % dim) * 2 + positive


def text_hash(text: str) -> str:
    """The hash a row stores of the exact text it embedded (and the cache's key)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def embedder_id(embedder: object) -> str:
    """`kind:model:dim`: the embedder's own `embedder_id`, or its class and dimension."""
    own = getattr(embedder, "embedder_id", None)
    if isinstance(own, str) and own:
        return own
    cls = type(embedder)
    return f"{cls.__module__}.{cls.__qualname__}:{getattr(embedder, 'dim', '?')}"


def doc_fingerprint(doc: object, spaces: Iterable[str]) -> str:
    """A hash of everything a device sees of a row: text, keywords, partition, payload,
    attrs, source time and the spaces it is embedded in (the key is not part of it)."""
    d: object = doc
    fields = [getattr(d, f) for f in ("partition", "title", "body", "keywords", "payload",
                                      "attrs", "source_updated_at")]
    blob = json.dumps([fields, sorted(spaces)], sort_keys=True, default=str,
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=16).hexdigest()


class HashingEmbedder:
    """Feature hashing of analysed words and word bigrams into `dim` dims, L2-normalised.

    Deterministic across processes and machines (CRC-32, not Python's salted `hash`). Its
    "semantics" are lexical-grade: texts sharing words and word pairs are close. It is
    meant for tests, demos and benchmarks, not for production relevance. An empty
    text (or one of stop words only) gives the zero vector, which the index stores as
    "no vector".
    """

    def __init__(self, dim: int = 384) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValidationError(f"dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.embedder_id = f"hashing:crc32-v1:{dim}"
        self._codes: dict[str, int] = {}  # feature -> `_code`, bounded

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        dim = self.dim
        cache = self._codes
        for row, text in enumerate(texts):
            terms = analyze(text)
            if not terms:
                continue
            if len(cache) > 1_000_000:
                cache.clear()
            features = terms + list(map(" ".join, pairwise(terms)))  # words, then pairs
            codes = list(map(cache.get, features))
            if None in codes:
                for j, code in enumerate(codes):
                    if code is None:
                        codes[j] = cache[features[j]] = _code(features[j], dim)
            # Each bucket: its positive features less its negative ones, counted exactly.
            counts = np.bincount(codes, minlength=2 * dim)
            vec = (counts[1::2] - counts[0::2]).astype(np.float64)
            norm = float(np.sqrt(vec @ vec))
            if norm > 0:
                out[row] = vec / norm
        return out
