"""slipstream.index: hybrid search (BM25 + cosine, fused by RRF) with one ranking on server and device.

Public API: `IndexDoc`, `SearchResult`, `SearchResults`, `SearchIndex`, `SQLiteBackend`,
`PostgresBackend`, `HashingEmbedder`, the `Embedder` protocol, and the error types.
The SQLite side needs only the standard library and NumPy; `PostgresBackend` is
imported lazily, so psycopg is loaded only when it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .analysis import ANALYZER, analyze
from .doc import NODE_KINDS, IndexDoc, SearchResult, SearchResults
from .embedding import Embedder, HashingEmbedder
from .errors import (
    ConfigurationError,
    DimensionMismatchError,
    DocumentTooLargeError,
    InvalidIdentifierError,
    MissingDependencyError,
    ScopeError,
    SlipstreamError,
    UnknownSpaceError,
    ValidationError,
)
from .search import SearchIndex
from .sqlite_backend import SQLiteBackend

if TYPE_CHECKING:
    from .postgres_backend import PostgresBackend

__all__ = [
    "ANALYZER", "NODE_KINDS", "ConfigurationError", "DimensionMismatchError",
    "DocumentTooLargeError", "Embedder",
    "HashingEmbedder", "IndexDoc", "InvalidIdentifierError", "MissingDependencyError",
    "PostgresBackend", "SQLiteBackend", "ScopeError", "SearchIndex", "SearchResult",
    "SearchResults", "SlipstreamError", "UnknownSpaceError", "ValidationError", "analyze",
]


def __getattr__(name: str) -> Any:
    if name == "PostgresBackend":
        from .postgres_backend import PostgresBackend

        return PostgresBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
