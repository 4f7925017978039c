"""Embedders: the `Embedder` protocol and `HashingEmbedder`, a deterministic one for tests and demos.

An embedder turns texts into float32 vectors of a fixed dimension, in one batch call.
Real deployments plug in a model (a local one, or an HTTP API); the index only needs
`dim` and `embed`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol, runtime_checkable

import numpy as np

from .analysis import analyze
from .errors import ValidationError


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to an (n, dim) float32 array. May raise on outage; the caller decides."""

    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


@lru_cache(maxsize=500_000)
def _bucket(feature: str, dim: int) -> tuple[int, float]:
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
    h = int.from_bytes(digest, "little")
    return h % dim, (1.0 if (h >> 63) & 1 else -1.0)


class HashingEmbedder:
    """Feature hashing of analysed words and word bigrams into `dim` dims, L2-normalised.

    Deterministic across processes and machines (BLAKE2b, not Python's `hash`). Its
    "semantics" are lexical-grade: texts sharing words and word pairs are close. It is
    meant for tests, demos and benchmarks, not for production relevance. An empty
    text (or one of stop words only) gives the zero vector, which the index stores as
    "no vector".
    """

    def __init__(self, dim: int = 384) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValidationError(f"dim must be a positive integer, got {dim!r}")
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        dim = self.dim
        for row, text in enumerate(texts):
            terms = analyze(text)
            if not terms:
                continue
            features = terms + [f"{a} {b}" for a, b in zip(terms, terms[1:])]
            buckets = [_bucket(f, dim) for f in features]
            vec = np.bincount([b[0] for b in buckets], weights=[b[1] for b in buckets],
                              minlength=dim)
            norm = float(np.sqrt(vec @ vec))
            if norm > 0:
                out[row] = vec / norm
        return out
