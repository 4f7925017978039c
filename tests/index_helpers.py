"""The `index` fixture both index test modules use: one SearchIndex per backend."""

from __future__ import annotations

import pytest
from slipstream.index import HashingEmbedder, PostgresBackend, SearchIndex, SQLiteBackend


def index_fixture(dim: int):
    """A fixture yielding a SearchIndex over SQLite, then over Postgres, with `dim`-d vectors."""

    @pytest.fixture(params=["sqlite", "postgres"])
    def index(request):
        if request.param == "sqlite":
            backend = SQLiteBackend(spaces={"local": dim})
        else:
            backend = PostgresBackend(request.getfixturevalue("pg_dsn"), spaces={"local": dim})
        yield SearchIndex(backend, HashingEmbedder(dim))
        backend.close()

    return index
