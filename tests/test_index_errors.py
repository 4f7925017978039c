"""Guarantee 8 for the index: bad input raises a typed error and writes nothing partial."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from slipstream.index import (
    ConfigurationError,
    DimensionMismatchError,
    DocumentTooLargeError,
    HashingEmbedder,
    IndexDoc,
    InvalidIdentifierError,
    PostgresBackend,
    ScopeError,
    SearchIndex,
    SlipstreamError,
    SQLiteBackend,
    UnknownSpaceError,
    ValidationError,
)

from .index_helpers import index_fixture

DIM = 16


index = index_fixture(DIM)


def count_rows(index: SearchIndex) -> int:
    backend = index.backend
    if isinstance(backend, SQLiteBackend):
        return backend.connection.execute("SELECT count(*) FROM docs").fetchone()[0]
    with backend.connection() as conn:
        return conn.execute("SELECT count(*) FROM slipstream.docs").fetchone()[0]


def test_every_error_is_a_slipstream_error() -> None:
    for cls in (ConfigurationError, DimensionMismatchError, DocumentTooLargeError,
                InvalidIdentifierError, ScopeError, UnknownSpaceError, ValidationError):
        assert issubclass(cls, SlipstreamError)


@pytest.mark.parametrize("kwargs, message", [
    ({"object_id": ""}, "object_id"),
    ({"node_kind": "page"}, "node_kind"),
    ({"attrs": {"bad key": 1}}, "attrs key"),
    ({"attrs": {"x') OR 1=1 --": 1}}, "not a plain identifier"),
    ({"payload": {"x": object()}}, "JSON"),
    ({"keywords": "not a list"}, "keywords"),
    ({"embed_spaces": ["bad-space"]}, "plain identifier"),
    ({"title": "nul\x00byte"}, "NUL"),
])
def test_bad_documents_are_rejected_on_construction(kwargs, message) -> None:
    base = {"object_type": "note", "object_id": "1"}
    with pytest.raises(ValidationError, match=message):
        IndexDoc(**{**base, **kwargs})


def test_batch_with_an_unknown_space_writes_nothing(index: SearchIndex) -> None:
    good = IndexDoc("note", "1", title="fine", partition="p")
    bad = IndexDoc("note", "2", title="names a space", partition="p", embed_spaces=["server"])
    with pytest.raises(UnknownSpaceError, match="server"):
        index.upsert_many([good, bad])
    assert count_rows(index) == 0


def test_a_document_beyond_the_servers_text_search_vector_is_refused_exactly_at_its_limit(
        index: SearchIndex) -> None:
    """Postgres keeps a row's distinct terms in a tsvector of at most 1,048,575 bytes of
    lexemes; one byte more fails the whole apply transaction (SQLSTATE 54000), so a
    document is refused before anything is written, on both backends alike. Numbers are
    terms as written (no stemming), so the byte count is exact."""
    terms = [f"{i:08d}" for i in range(131_071)] + ["1234567"]  # 1,048,568 + 7 bytes
    at_limit = IndexDoc("note", "fits", body=" ".join(terms), partition="p")
    index.upsert_many([at_limit])
    assert count_rows(index) == 1
    over = IndexDoc("note", "over", body=" ".join(terms + ["9"]), partition="p")
    small = IndexDoc("note", "small", title="fine", partition="p")
    with pytest.raises(DocumentTooLargeError, match=r"131,073 distinct terms take 1,048,576 bytes.*index less of the text"):
        index.upsert_many([small, over])
    assert count_rows(index) == 1


def test_dimension_mismatch_names_space_expected_and_actual(index: SearchIndex) -> None:
    docs = [IndexDoc("note", str(i), title="x", partition="p") for i in range(3)]
    vectors = {0: {"local": np.ones(DIM)}, 2: {"local": np.ones(DIM + 3)}}
    with pytest.raises(DimensionMismatchError) as err:
        index.backend.write(index.prepare(docs, vectors))
    assert (err.value.space, err.value.expected, err.value.actual) == ("local", DIM, DIM + 3)
    assert "'local'" in str(err.value) and str(DIM + 3) in str(err.value)
    assert count_rows(index) == 0


def test_embedder_of_the_wrong_dimension_is_a_configuration_error(index: SearchIndex) -> None:
    with pytest.raises(ConfigurationError, match="emits 8-d"):
        SearchIndex(index.backend, {"local": HashingEmbedder(8)})
    with pytest.raises(ConfigurationError, match="does not define"):
        SearchIndex(index.backend, {"server": HashingEmbedder(DIM)})


def test_duplicate_keys_in_one_batch_are_rejected(index: SearchIndex) -> None:
    doc = IndexDoc("note", "1", title="x", partition="p")
    with pytest.raises(ValidationError, match="twice"):
        index.upsert_many([doc, doc])
    assert count_rows(index) == 0


def test_search_argument_errors(index: SearchIndex) -> None:
    index.upsert(IndexDoc("note", "1", title="hello", partition="p"))
    assert list(index.search("", partition="p")) == []
    assert list(index.search("   ", partition="p")) == []
    with pytest.raises(ValidationError, match="k must be"):
        index.search("hello", partition="p", k=0)
    with pytest.raises(UnknownSpaceError):
        index.search("hello", partition="p", space="server")
    with pytest.raises(InvalidIdentifierError):
        index.search("hello", partition="p", attrs={"a.b": 1})
    with pytest.raises(InvalidIdentifierError):
        index.search("hello", partition="p", attrs={"x')) OR 1=1 --": 1})
    with pytest.raises(ValidationError, match="mode"):
        index.search("hello", partition="p", mode="fast")
    with pytest.raises(ValidationError, match="attrs filter"):
        index.search("hello", partition="p", attrs={"tags": ["a"]})
    with pytest.raises(ValidationError, match="diversity_cap"):
        index.search("hello", partition="p", diversity_key="object_type")
    with pytest.raises(DimensionMismatchError):
        index.search("hello", partition="p", query_vector=np.ones(3))


def test_server_search_must_state_its_scope(pg_dsn: str) -> None:
    backend = PostgresBackend(pg_dsn, spaces={"local": DIM})
    index = SearchIndex(backend, HashingEmbedder(DIM))
    index.upsert_many([IndexDoc("note", "1", title="hello", partition="A"),
                       IndexDoc("note", "2", title="hello", partition="B")])
    with pytest.raises(ScopeError, match="all_partitions=True"):
        index.search("hello")
    with pytest.raises(ValidationError, match="not both"):
        index.search("hello", partition="A", all_partitions=True)
    assert [r.object_id for r in index.search("hello", partition="A")] == ["1"]
    assert sorted(r.object_id for r in index.search("hello", all_partitions=True)) == ["1", "2"]
    backend.close()


def test_schema_creation_is_idempotent_and_tracked(pg_dsn: str) -> None:
    first = PostgresBackend(pg_dsn, spaces={"local": DIM})
    first.create_schema()
    second = PostgresBackend(pg_dsn, spaces={"local": DIM, "server": 24})
    with psycopg.connect(pg_dsn) as conn:
        from slipstream.index.pg_schema import MIGRATIONS

        assert conn.execute("SELECT version FROM slipstream.migrations ORDER BY 1").fetchall() == [
            (m[0],) for m in MIGRATIONS]
        assert dict(conn.execute("SELECT name, dim FROM slipstream.spaces").fetchall()) == {
            "local": DIM, "server": 24}
    with pytest.raises(ConfigurationError, match="is 16-d"):
        PostgresBackend(pg_dsn, spaces={"local": 32})
    with pytest.raises(InvalidIdentifierError):
        PostgresBackend(pg_dsn, schema="bad; DROP TABLE x")
    first.close()
    second.close()


def test_shard_dimension_conflict_is_a_configuration_error(tmp_path) -> None:
    path = tmp_path / "s.db"
    SQLiteBackend(path, spaces={"local": DIM}).close()
    with pytest.raises(ConfigurationError, match="is 16-d"):
        SQLiteBackend(path, spaces={"local": 8})
    reopened = SQLiteBackend(path)
    assert reopened.spaces == {"local": DIM}
    assert reopened.connection.execute("SELECT version FROM migrations").fetchall() == [(1,)]
