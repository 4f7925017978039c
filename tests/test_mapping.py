"""Mappers without a database: the TOML mapper's output, chunking, object ids, and the registry's contract."""

from __future__ import annotations

import json
import textwrap
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from slipstream.index.doc import IndexDoc
from slipstream.index.errors import ConfigurationError, ValidationError
from slipstream.worker import mapping
from slipstream.worker.config import ConfigError, parse_config
from slipstream.worker.mapping import MapperError, Registry, TomlMapper, object_id, register
from slipstream.worker.pgoutput import UNCHANGED
from slipstream.worker.pgtypes import OID, decode_text
from slipstream.worker.templates import Template, json_safe, split_chunks, to_text

NOTE_ID = uuid.UUID("6f1c2a4e-8d3b-4c1e-9a7f-2b5d0e8c4a11")


def notes_config(**table: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "object_type": "note", "id_columns": ["id"],
        "title": "{title}", "body": "{body}", "keywords": ["tags"], "partition": "org-{owner_id}",
        "attrs": ["status", "rating", "score"], "payload": ["title", "created_at", "author_id"],
        "spaces": ["local"], "updated_at": "updated_at",
        "filter": {"status": ["published", "archived"], "not_null": ["owner_id"]},
    }
    spec.update(table)
    return {"source": {"dsn": "postgresql://app@localhost/app"}, "spaces": {"local": 8},
            "embedders": {"local": {"kind": "hashing"}}, "tables": {"public.notes": spec}}


def toml_mapper(**table: Any) -> TomlMapper:
    return TomlMapper(parse_config(notes_config(**table)).tables["public.notes"])


def note_row(**changes: object) -> dict[str, object]:
    """A row as the decoder produces it: values decoded from pgoutput text by type OID."""
    row: dict[str, object] = {
        "id": decode_text(OID["uuid"], str(NOTE_ID)),
        "title": "Quarterly planning",
        "body": "Agenda: budget, hiring and the roadmap.",
        "tags": decode_text(1009, '{planning,"q3 2025",NULL,planning}'),  # text[]
        "owner_id": decode_text(OID["int8"], "42"),
        "status": "published",
        "rating": decode_text(OID["numeric"], "4.50"),
        "score": decode_text(OID["float8"], "NaN"),
        "created_at": decode_text(OID["timestamptz"], "2025-03-01 09:30:00+00"),
        "updated_at": decode_text(OID["timestamptz"], "2025-03-02 10:00:00.5+01"),
        "author_id": decode_text(OID["uuid"], "0a0b0c0d-0000-4000-8000-000000000001"),
    }
    row.update(changes)
    return row


@pytest.fixture
def default_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    """A fresh DEFAULT_REGISTRY, so @register in one test does not leak into another."""
    fresh = Registry()
    monkeypatch.setattr(mapping, "DEFAULT_REGISTRY", fresh)
    yield fresh


# -- the TOML mapper -------------------------------------------------------------------------

def test_toml_mapper_maps_a_realistic_row() -> None:
    [doc] = toml_mapper()(note_row(), "insert")
    assert doc.key == ("note", str(NOTE_ID), "leaf")
    assert doc.title == "Quarterly planning"
    assert doc.body == "Agenda: budget, hiring and the roadmap."
    assert doc.keywords == ("planning", "q3 2025")  # NULL dropped, repeats once
    assert doc.partition == "org-42"
    assert doc.embed_spaces == ("local",)
    assert doc.attrs == {"status": "published", "rating": 4.5, "score": None}
    assert doc.payload == {"title": "Quarterly planning", "created_at": "2025-03-01T09:30:00+00:00",
                           "author_id": "0a0b0c0d-0000-4000-8000-000000000001"}
    assert doc.source_updated_at == datetime(2025, 3, 2, 9, 0, 0, 500000, tzinfo=UTC)
    json.dumps({"attrs": dict(doc.attrs), "payload": dict(doc.payload)}, allow_nan=False)
    assert toml_mapper()(note_row(), "snapshot") == [doc]  # op does not change the output


def test_null_renders_as_empty_text_and_literal_braces_survive() -> None:
    [doc] = toml_mapper(title="{title} {{draft}}", body="{body}")(note_row(title=None, body=None),
                                                                  "update")
    assert (doc.title, doc.body) == (" {draft}", "")


def test_filter_pass_and_fail() -> None:
    m = toml_mapper()
    assert m(note_row(status="archived"), "insert") != []
    assert m(note_row(status="draft"), "insert") == []
    assert m(note_row(status=None), "insert") == []  # NULL is never one of the values
    assert m(note_row(owner_id=None), "insert") == []  # not_null


def test_filter_compares_values_as_their_json_form_but_not_bool_as_int() -> None:
    m = toml_mapper(filter={"author_id": ["0a0b0c0d-0000-4000-8000-000000000001"],
                            "rating": [4.5], "owner_id": [42]})
    assert m(note_row(), "insert") != []  # UUID vs string, Decimal vs float, int vs int
    assert toml_mapper(filter={"owner_id": [True]})(note_row(owner_id=1), "insert") == []
    assert toml_mapper(filter={"flag": [True]})(note_row(flag=True), "insert") != []
    on = toml_mapper(filter={"day": [date(2025, 3, 1)]})
    assert on(note_row(day=date(2025, 3, 1)), "insert") != []
    assert on(note_row(day=date(2025, 3, 2)), "insert") == []


def test_keywords_from_a_single_text_column_and_nested_arrays() -> None:
    m = toml_mapper(keywords=["status", "tags"])
    [doc] = m(note_row(tags=[["a", "b"], ["c", None]]), "insert")
    assert doc.keywords == ("published", "a", "b", "c")


def test_missing_column_at_map_time_names_the_key() -> None:
    row = note_row()
    del row["owner_id"]
    with pytest.raises(MapperError, match=r'tables\."public\.notes"\.filter\.not_null: the row has '
                                          r"no column 'owner_id'"):
        toml_mapper()(row, "insert")
    row = note_row()
    del row["title"]
    with pytest.raises(MapperError, match=r'tables\."public\.notes"\.title: the row has no column'):
        toml_mapper(filter={})(row, "insert")


def test_empty_partition_is_a_mapper_error_that_says_how_to_skip() -> None:
    with pytest.raises(MapperError, match="filter.not_null"):
        toml_mapper(partition="{owner_id}", filter={})(note_row(owner_id=None), "insert")


@pytest.mark.parametrize("owner", [None, "", []])
def test_a_partition_column_that_is_null_is_a_mapper_error_not_a_shared_partition(owner: object) -> None:
    """Regression: "org-{owner_id}" rendered "org-" for every row whose owner was NULL, so
    the ownerless rows of all tenants were indexed together in one partition "org-", for
    any device given a token for it. A partition's column must name a tenant."""
    mapper = toml_mapper(filter={})
    with pytest.raises(MapperError, match=r"\.partition: 'org-\{owner_id\}' needs column "
                                          r"'owner_id', which is NULL or empty .*filter\.not_null"):
        mapper(note_row(owner_id=owner), "insert")
    assert [d.partition for d in mapper(note_row(owner_id=0), "insert")] == ["org-0"]
    assert toml_mapper()(note_row(owner_id=None), "insert") == []  # filter.not_null leaves it out


def test_bytea_in_a_template_or_wrong_updated_at_type_is_a_mapper_error() -> None:
    with pytest.raises(MapperError, match=r"\.body: a bytea value"):
        toml_mapper(body="{blob}")(note_row(blob=b"\x00\x01"), "insert")
    with pytest.raises(MapperError, match=r"\.updated_at: .* holds a str, not a timestamp"):
        toml_mapper()(note_row(updated_at="yesterday"), "insert")


def test_a_date_column_as_updated_at_is_the_start_of_that_day_in_utc() -> None:
    """Regression: an `updated_on date` column named as updated_at made every row a dead
    letter ("holds a date, not a timestamp")."""
    [doc] = toml_mapper()(note_row(updated_at=date(2025, 1, 2)), "insert")
    assert doc.source_updated_at == datetime(2025, 1, 2, tzinfo=UTC)


def test_invalid_document_becomes_mapper_error_with_cause() -> None:
    with pytest.raises(MapperError) as info:
        toml_mapper(title="{title}")(note_row(title="nul\x00byte"), "insert")
    assert isinstance(info.value.__cause__, ValidationError)


def test_resolved_fills_id_columns_from_the_replica_identity_and_checks_columns() -> None:
    m = toml_mapper(id_columns=[])
    with pytest.raises(MapperError, match="id_columns: not known yet"):
        m(note_row(), "insert")
    columns = set(note_row())
    [doc] = m.resolved(columns, ["id"])(note_row(), "insert")
    assert doc.object_id == str(NOTE_ID)
    with pytest.raises(ConfigError) as info:
        m.resolved(columns - {"owner_id"}, ["id"])
    assert info.value.path == 'tables."public.notes".partition'
    with pytest.raises(ConfigError, match="no primary key or replica identity"):
        m.resolved(columns, [])


def test_id_columns_must_hold_a_key_the_table_keeps_unique() -> None:
    """Regression: `id_columns = ["owner_id"]` was taken as given, so every note of an owner
    mapped to one document, each overwriting the last, and deleting any note deleted it."""
    columns = set(note_row())
    unique = [["id"], ["author_id", "created_at"]]
    with pytest.raises(ConfigError) as info:
        toml_mapper(id_columns=["owner_id"]).resolved(columns, ["id"], unique=unique)
    assert info.value.path == 'tables."public.notes".id_columns'
    assert "no primary key or unique index lies within them" in str(info.value)
    assert "CREATE UNIQUE INDEX ON public.notes (owner_id)" in str(info.value)
    for ids in (["id"], ["owner_id", "id"], ["created_at", "author_id", "title"]):
        toml_mapper(id_columns=ids).resolved(columns, ["id"], unique=unique)
    # A table that declares nothing unique (REPLICA IDENTITY FULL, no key) is taken at its word.
    [doc] = toml_mapper(id_columns=["owner_id"]).resolved(columns, list(columns))(note_row(), "insert")
    assert doc.object_id == "42"


# -- object ids --------------------------------------------------------------------------------

def test_object_id_single_and_composite_with_escaping() -> None:
    assert object_id([7]) == "7"
    assert object_id(["a:b"]) == "a:b"  # one column: the value as is
    assert object_id([NOTE_ID]) == str(NOTE_ID)
    assert object_id([b"\x01\xff"]) == "01ff"
    assert object_id([7, "x"]) == "7:x"
    assert object_id(["a:b", "c"]) == "a\\:b:c"
    assert object_id(["a", "b:c"]) == "a:b\\:c"
    assert object_id(["a\\", "b"]) == "a\\\\:b"
    assert object_id(["a", "\\:b"]) == "a:\\\\\\:b"
    with pytest.raises(ValueError, match="NULL"):
        object_id([1, None])
    with pytest.raises(ValueError, match="empty"):
        object_id([""])


@given(st.lists(st.lists(st.text(alphabet="ab:\\", min_size=1, max_size=4), min_size=2,
                         max_size=3), min_size=2, max_size=2))
def test_composite_ids_never_collide(pair: list[list[str]]) -> None:
    a, b = pair
    assert (object_id(a) == object_id(b)) == (a == b)


def test_composite_id_in_the_toml_mapper() -> None:
    [doc] = toml_mapper(id_columns=["owner_id", "title"], filter={})(
        note_row(title="plan: q3"), "insert")
    assert doc.object_id == "42:plan\\: q3"
    with pytest.raises(MapperError, match=r"id_columns \['owner_id', 'title'\]: an id column is NULL"):
        toml_mapper(id_columns=["owner_id", "title"], filter={})(note_row(title=None), "insert")


# -- chunks ---------------------------------------------------------------------------------------

def test_chunks_cover_the_body_overlap_and_point_to_their_parent() -> None:
    words = [f"word{i:03d}" for i in range(300)]
    body = " ".join(words)
    m = toml_mapper(chunks={"size": 200, "overlap": 40})
    leaf, *chunks = m(note_row(body=body), "insert")
    assert leaf.key == ("note", str(NOTE_ID), "leaf") and leaf.body == body
    assert len(chunks) > 5
    covered = [False] * len(body)
    previous_end = None
    for n, doc in enumerate(chunks):
        assert doc.key == ("note", f"{NOTE_ID}~{n}", "chunk")
        start = doc.payload["chunk_start"]
        assert doc.payload["parent_id"] == str(NOTE_ID) and doc.payload["chunk_index"] == n
        assert doc.payload["title"] == "Quarterly planning"  # the object's payload travels along
        assert body[start:start + len(doc.body)] == doc.body and len(doc.body) <= 200
        assert doc.title == "" and doc.keywords == ()
        assert (doc.partition, doc.attrs, doc.embed_spaces) == (leaf.partition, leaf.attrs,
                                                                 leaf.embed_spaces)
        # cut between words, and each chunk starts at a word
        assert doc.body.split()[0] in words and doc.body.split()[-1] in words
        if previous_end is not None:
            assert previous_end - start >= 40  # at least `overlap` characters shared
        previous_end = start + len(doc.body)
        for i in range(start, previous_end):
            covered[i] = True
    assert all(covered)


def test_short_body_has_no_chunks() -> None:
    docs = toml_mapper(chunks={"size": 200, "overlap": 20})(note_row(body="x" * 200), "insert")
    assert [d.node_kind for d in docs] == ["leaf"]


@given(text=st.text(alphabet=st.sampled_from("ab \n"), max_size=400),
       size=st.integers(1, 60), overlap_ratio=st.floats(0, 0.99))
def test_split_chunks_covers_everything_in_order(text: str, size: int, overlap_ratio: float) -> None:
    overlap = min(size - 1, int(size * overlap_ratio))
    chunks = split_chunks(text, size, overlap)
    assert chunks[0][0] == 0
    end = 0
    for i, (start, piece) in enumerate(chunks):
        assert text[start:start + len(piece)] == piece and 0 < len(piece) <= size or text == ""
        assert start <= end  # no gap
        if i:
            assert start > chunks[i - 1][0]  # progress
            assert end - start >= overlap
        end = start + len(piece)
    assert end == len(text)


def test_split_chunks_without_whitespace_cuts_hard() -> None:
    assert split_chunks("abcdefghij", 4, 1) == [(0, "abcd"), (3, "defg"), (6, "ghij")]


# -- value conversion ------------------------------------------------------------------------------

def test_json_safe_and_to_text_conversions() -> None:
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert json_safe(Decimal("1.10")) == 1.1 and json_safe(Decimal("NaN")) is None
    # An integral numeric keeps every digit (as a float it would read 12345678901234567168).
    assert json_safe(Decimal("12345678901234567890")) == 12345678901234567890
    assert type(json_safe(Decimal("12345678901234567890"))) is int and json_safe(Decimal("-3.000")) == -3
    assert json_safe(float("inf")) is None and json_safe(when) == "2025-01-02T03:04:05+00:00"
    assert json_safe(b"\x00\xff") == "AP8=" and json_safe(NOTE_ID) == str(NOTE_ID)
    assert json_safe({"a": [Decimal(2), date(2025, 1, 1)]}) == {"a": [2.0, "2025-01-01"]}
    with pytest.raises(TypeError):
        json_safe(object())
    assert to_text(True) == "true" and to_text(Decimal("1.10")) == "1.10"
    assert to_text(["a", None, "b"]) == "a, b" and to_text({"b": 1, "a": 2}) == '{"a":2,"b":1}'
    assert Template.parse("{a}-{b}-{a}").columns == ("a", "b")


# -- the registry ----------------------------------------------------------------------------------

def test_register_decorator_lands_in_the_default_registry(default_registry: Registry) -> None:
    @register("public.users")
    def users(row: Mapping[str, object], op: str) -> list[IndexDoc]:
        return [IndexDoc("user", str(row["id"]), title=str(row["name"]))]

    assert users is default_registry.get("public.users")  # the function itself is returned
    assert default_registry.map("public.users", {"id": 1, "name": "Ann"}, "insert") == [
        IndexDoc("user", "1", title="Ann")]
    assert "test_mapping" in default_registry.origin("public.users")


def test_mapper_modules_are_imported_and_their_mappers_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default_registry: Registry) -> None:
    package = tmp_path / "tmp_myapp_one"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "search_mappers.py").write_text(textwrap.dedent("""
        from slipstream.index import IndexDoc
        from slipstream.worker.mapping import register

        @register("public.users")
        def users(row, op):
            return [IndexDoc("user", str(row["id"]), title=row["name"])]

        def invoices(row, op):
            return [IndexDoc("invoice", str(row["id"]), body=op)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    data = notes_config()
    data["worker"] = {"mapper_modules": ["tmp_myapp_one.search_mappers"]}
    data["tables"]["public.invoices"] = {"python": "tmp_myapp_one.search_mappers:invoices"}
    registry = Registry.from_config(parse_config(data))
    assert registry.tables() == ("public.invoices", "public.notes", "public.users")
    assert isinstance(registry.get("public.notes"), TomlMapper)
    assert registry.map("public.users", {"id": 5, "name": "Bo"}, "snapshot")[0].title == "Bo"
    assert registry.map("public.invoices", {"id": 9}, "update")[0].body == "update"
    assert "python" in registry.origin("public.invoices")


def test_a_table_in_toml_and_in_python_is_a_config_error(default_registry: Registry) -> None:
    @register("public.notes")
    def notes(row: Mapping[str, object], op: str) -> list[IndexDoc]:
        return []

    with pytest.raises(ConfigError) as info:
        Registry.from_config(parse_config(notes_config()))
    assert info.value.path == 'tables."public.notes"'
    assert "mapped twice" in str(info.value) and "test_mapping" in str(info.value)


def test_registering_two_functions_for_one_table_is_a_config_error() -> None:
    registry = Registry()
    registry.register("public.users", lambda row, op: [])
    with pytest.raises(ConfigError, match="mapped twice"):
        registry.register("public.users", lambda row, op: [])
    same = registry.get("public.users")
    assert same is not None
    registry.add("public.users", same)  # the same function again is not a second declaration


def test_register_checks_the_table_name_and_the_signature() -> None:
    registry = Registry()
    with pytest.raises(ConfigError, match='"schema.table"'):
        registry.register("users")
    with pytest.raises(ConfigError, match=r"mapper\(row, op\)"):
        registry.register("public.users", lambda row: [])
    with pytest.raises(ConfigError, match="not callable"):
        registry.add("public.users", "nope")  # type: ignore[arg-type]


def test_from_config_import_errors_name_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default_registry: Registry) -> None:
    (tmp_path / "tmp_broken_mappers.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "tmp_ok_mappers.py").write_text("value = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = notes_config()
    data["worker"] = {"mapper_modules": ["tmp_no_such_module_xyz"]}
    with pytest.raises(ConfigError, match="PYTHONPATH") as info:
        Registry.from_config(parse_config(data))
    assert info.value.path == "worker.mapper_modules[0]"
    data["worker"] = {"mapper_modules": ["tmp_ok_mappers", "tmp_broken_mappers"]}
    with pytest.raises(ConfigError, match="boom at import") as info:
        Registry.from_config(parse_config(data))
    assert info.value.path == "worker.mapper_modules[1]"
    assert isinstance(info.value.__cause__, RuntimeError)
    for ref, words in [("tmp_ok_mappers:missing", "has no attribute"),
                       ("tmp_ok_mappers:value", "not a function"),
                       ("json:dumps", r"mapper\(row, op\)")]:
        data = notes_config()
        data["tables"]["public.invoices"] = {"python": ref}
        with pytest.raises(ConfigError, match=words) as info:
            Registry.from_config(parse_config(data))
        assert info.value.path == 'tables."public.invoices".python'


def test_an_empty_registry_is_a_config_error(default_registry: Registry) -> None:
    with pytest.raises(ConfigError, match="nothing to index"):
        Registry.from_config(parse_config({"source": {"dsn": "host=db"}}))


def test_a_raising_mapper_becomes_mapper_error_with_the_cause_chained() -> None:
    registry = Registry()

    @registry.register("public.users")
    def users(row: Mapping[str, object], op: str) -> list[IndexDoc]:
        return [IndexDoc("user", str(1 / row["n"]))]  # type: ignore[operator]

    with pytest.raises(MapperError, match="ZeroDivisionError") as info:
        registry.map("public.users", {"n": 0}, "insert")
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert info.value.table == "public.users"
    assert isinstance(info.value, mapping.SlipstreamError)
    assert not isinstance(info.value, ConfigurationError)


@pytest.mark.parametrize(("result", "words"), [
    (None, "returned NoneType"),
    (IndexDoc("user", "1"), "returned IndexDoc"),
    ([{"object_type": "user"}], "a list holding dict"),
    ((d for d in []), "returned generator"),
    ([IndexDoc("user", "1"), IndexDoc("user", "1", title="again")], "twice"),
])
def test_a_bad_return_value_is_a_mapper_error(result: object, words: str) -> None:
    registry = Registry()
    registry.register("public.users", lambda row, op: result)
    with pytest.raises(MapperError, match=words):
        registry.map("public.users", {}, "insert")


def test_tuple_results_are_accepted_as_lists() -> None:
    registry = Registry()
    registry.register("public.users", lambda row, op: (IndexDoc("user", "1"),))
    assert registry.map("public.users", {}, "insert") == [IndexDoc("user", "1")]


def test_map_refuses_bad_input_before_calling_the_mapper() -> None:
    calls: list[object] = []
    registry = Registry()
    registry.register("public.users", lambda row, op: calls.append(row) or [])
    with pytest.raises(ValidationError, match="deletes are not mapped"):
        registry.map("public.users", {}, "delete")
    with pytest.raises(ValidationError, match="UNCHANGED for body"):
        registry.map("public.users", {"id": 1, "body": UNCHANGED}, "update")
    with pytest.raises(ValidationError, match="mapping"):
        registry.map("public.users", [("id", 1)], "insert")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no mapper for public.other"):
        registry.map("public.other", {}, "insert")
    assert calls == []


def test_mappers_get_a_read_only_row() -> None:
    registry = Registry()

    def meddle(row: Any, op: str) -> list[IndexDoc]:
        row["id"] = 2
        return []

    registry.register("public.users", meddle)
    row = {"id": 1}
    with pytest.raises(MapperError, match="TypeError"):
        registry.map("public.users", row, "insert")
    assert row == {"id": 1}


def test_resolve_replaces_only_toml_mappers(default_registry: Registry) -> None:
    data = notes_config(id_columns=[])
    data["tables"]["public.invoices"] = {"python": "operator:add"}  # any (row, op) callable
    registry = Registry.from_config(parse_config(data))
    python = registry.get("public.invoices")
    registry.resolve("public.notes", set(note_row()), ["id"])
    registry.resolve("public.invoices", {"id"}, ["id"])
    assert registry.get("public.invoices") is python
    [doc] = registry.map("public.notes", note_row(), "insert")
    assert doc.object_id == str(NOTE_ID)
