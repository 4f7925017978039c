"""The `[tables."schema.table"]` sections of the configuration: what a TOML mapper is told.

This module owns `TableConfig` (with its row filter and chunking) and `TableReader`,
the checks made on a table section when the configuration loads: key names, templates,
columns, spaces, node kind, the `python = "pkg.mod:func"` form. `config` builds the
whole `WorkerConfig` on top of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from types import MappingProxyType
from typing import Any

from slipstream.index.doc import IDENTIFIER, NODE_KINDS

from .templates import Template, TemplateError
from .tomlreader import MISSING, ConfigError, TomlReader, did_you_mean, key_path, type_name

CHUNK_PAYLOAD_KEYS = ("parent_id", "chunk_index", "chunk_start")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_PG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
_EMPTY_TEMPLATE = Template.parse("")
_DEFAULT_PARTITION = Template.parse("default")
_TABLE_KEYS = ("object_type", "id_columns", "title", "body", "keywords", "partition", "attrs",
               "payload", "spaces", "node_kind", "updated_at", "filter", "chunks", "python",
               "max_body_chars")


@dataclass(frozen=True, slots=True)
class FilterConfig:
    """[tables."x".filter]: a row is indexed only if every condition holds.

    `one_of` maps a column to the values it must equal (one of); `not_null` lists
    columns that must not be NULL. A row that fails maps to no documents.
    """

    one_of: Mapping[str, tuple[Any, ...]] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))
    not_null: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.one_of, *self.not_null]))


@dataclass(frozen=True, slots=True)
class ChunkConfig:
    """[tables."x".chunks]: bodies longer than `size` characters also become chunk nodes."""

    size: int
    overlap: int = 0


@dataclass(frozen=True, slots=True)
class TableConfig:
    """[tables."schema.table"]: how the TOML mapper turns one row into documents.

    With `python` set ("pkg.mod:func"), that callable is the table's mapper and the
    other fields are unused. Templates are parsed; `id_columns` may be empty, meaning
    "the replica identity", which the worker fills in from the catalog.
    """

    table: str
    object_type: str
    id_columns: tuple[str, ...] = ()
    title: Template = _EMPTY_TEMPLATE
    body: Template = _EMPTY_TEMPLATE
    partition: Template = _DEFAULT_PARTITION
    keywords: tuple[str, ...] = ()
    attrs: tuple[str, ...] = ()
    payload: tuple[str, ...] = ()
    spaces: tuple[str, ...] | None = None
    node_kind: str = "leaf"
    updated_at: str | None = None
    filter: FilterConfig | None = None
    chunks: ChunkConfig | None = None
    max_body_chars: int | None = None  # the object's own document keeps at most this much body
    python: str | None = None
    origin: str = dataclasses.field(default="<string>", repr=False, compare=False)

    @property
    def path(self) -> str:
        return key_path("tables", self.table)

    def fingerprint(self) -> str:
        """A hash of everything that decides the documents a row maps to: every key of the
        section as parsed (templates by their text), not where it was read from. The
        worker records it with a table's copy and copies the table again when it changes."""
        def plain(value: Any) -> Any:
            if isinstance(value, Template):
                return value.source
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, Mapping):
                return {str(k): plain(v) for k, v in value.items()}
            if isinstance(value, (tuple, list)):
                return [plain(v) for v in value]
            return value
        section = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                   if f.name not in ("table", "origin")}
        text = json.dumps(section, sort_keys=True, default=repr, separators=(",", ":"))
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()

    def column_uses(self) -> list[tuple[str, str]]:
        """(key path, column) for every column the configuration reads from a row."""
        uses = [(key_path("tables", self.table, "id_columns"), c) for c in self.id_columns]
        for name in ("title", "body", "partition"):
            uses += [(key_path("tables", self.table, name), c)
                     for c in getattr(self, name).columns]
        for name in ("keywords", "attrs", "payload"):
            uses += [(key_path("tables", self.table, name), c) for c in getattr(self, name)]
        if self.updated_at is not None:
            uses.append((key_path("tables", self.table, "updated_at"), self.updated_at))
        if self.filter is not None:
            uses += [(key_path("tables", self.table, "filter", c), c) for c in self.filter.one_of]
            uses += [(key_path("tables", self.table, "filter", "not_null"), c)
                     for c in self.filter.not_null]
        return uses

    def check_columns(self, columns: Collection[str], unpublished: Collection[str] = ()) -> None:
        """Raise ConfigError if the configuration names a column the table does not have,
        or a generated column the replication stream does not carry (`unpublished`)."""
        if self.python is not None:
            return
        for path, column in self.column_uses():
            if column in unpublished:
                raise ConfigError(
                    f"column {column!r} of {self.table} is a generated column, which logical "
                    "replication does not carry (PostgreSQL 18 publishes STORED generated "
                    "columns, earlier versions none, and VIRTUAL ones are never published); "
                    "name the columns it is computed from instead", path=path, source=self.origin)
            if column not in columns:
                raise ConfigError(
                    f"column {column!r} does not exist in {self.table} (its columns: "
                    f"{', '.join(sorted(columns))}){did_you_mean(column, columns)}",
                    path=path, source=self.origin)


class TableReader(TomlReader):
    """Typed reading of table sections (and the template and space lists they use)."""

    def template(self, sec: Mapping[str, Any], path: tuple[str | int, ...], default: str) -> Template:
        value = self.get(sec, path, default, (str,), "a template string such as \"{title}\"")
        try:
            return Template.parse(value)
        except TemplateError as exc:
            self.fail(path, str(exc))

    def spaces(self, sec: Mapping[str, Any], path: tuple[str | int, ...],
               spaces: Mapping[str, int]) -> tuple[str, ...] | None:
        names = self.str_list(sec, path, None, "an array of space names")
        for i, name in enumerate(names or ()):
            if name not in spaces:
                known = ", ".join(spaces) or "none are defined"
                self.fail((*path, i), f"space {name!r} is not defined in [spaces] ({known})"
                          f"{did_you_mean(name, spaces)}")
        return names

    def table(self, raw: object, name: str, spaces: Mapping[str, int]) -> TableConfig:
        path: tuple[str, ...] = ("tables", name)
        schema, dot, table = name.partition(".")
        if not dot:
            nested = isinstance(raw, Mapping) and raw and all(isinstance(v, Mapping) for v in raw.values())
            example = f'{name}.{next(iter(raw))}' if nested else f"public.{name}"
            self.fail(path, f'table keys are "schema.table" in quotes; write [tables."{example}"]')
        for part in (schema, table):
            if not _PG_NAME.fullmatch(part):
                self.fail(path, f"{part!r} is not a plain Postgres name; use letters, digits, "
                          "_ and $, starting with a letter or _, at most 63 characters")
        sec = self.section(raw, path, _TABLE_KEYS)
        if "python" in sec:
            ref = self.string(sec, (*path, "python"), MISSING, '"package.module:function"')
            module, colon, attr = ref.partition(":")
            if not colon or not _MODULE.fullmatch(module) or not _MODULE.fullmatch(attr):
                self.fail((*path, "python"), f"{ref!r} is not an import reference; write "
                          '"package.module:function"')
            for key in sec:
                if key != "python":
                    self.fail((*path, key), "a table with python = … is mapped by that function "
                              "alone; remove this key or the python key")
            return TableConfig(table=name, object_type=table, python=ref, origin=self.source)
        filter_cfg = chunks = None
        if "filter" in sec:
            filter_cfg = self.row_filter(sec["filter"], (*path, "filter"))
        if "chunks" in sec:
            chunks = self.chunks(sec["chunks"], (*path, "chunks"))
        node_kind = self.string(sec, (*path, "node_kind"), "leaf", f"one of {', '.join(NODE_KINDS)}")
        if node_kind not in NODE_KINDS:
            self.fail((*path, "node_kind"), f"{node_kind!r} is not a node kind; use one of "
                      f"{', '.join(NODE_KINDS)}{did_you_mean(node_kind, NODE_KINDS)}")
        attrs = self.str_list(sec, (*path, "attrs"), ())
        for i, column in enumerate(attrs):
            self.check_name(column, (*path, "attrs", i), "usable as an attrs key", IDENTIFIER,
                            "a column whose name is a plain identifier (a Python mapper can "
                            "rename others)")
        payload = self.str_list(sec, (*path, "payload"), ())
        for i, column in enumerate(payload):
            if chunks is not None and column in CHUNK_PAYLOAD_KEYS:
                self.fail((*path, "payload", i), f"{column!r} is a payload key chunk nodes set "
                          "themselves; drop it here, or write a Python mapper")
        object_type = self.string(sec, (*path, "object_type"), table)
        if len(object_type) > 512 or "\x00" in object_type:
            self.fail((*path, "object_type"), "must be at most 512 characters with no NUL")
        updated_at = self.string(sec, (*path, "updated_at"), None, "a timestamp column name")
        return TableConfig(
            table=name, object_type=object_type, origin=self.source,
            id_columns=self.str_list(sec, (*path, "id_columns"), ()),
            title=self.template(sec, (*path, "title"), ""),
            body=self.template(sec, (*path, "body"), ""),
            partition=self.template(sec, (*path, "partition"), "default"),
            keywords=self.str_list(sec, (*path, "keywords"), ()),
            attrs=attrs, payload=payload, spaces=self.spaces(sec, (*path, "spaces"), spaces),
            node_kind=node_kind, updated_at=updated_at, filter=filter_cfg, chunks=chunks,
            max_body_chars=(self.integer(sec, (*path, "max_body_chars"), None, 1)
                            if "max_body_chars" in sec else None))

    def row_filter(self, raw: object, path: tuple[str, ...]) -> FilterConfig:
        sec = self.section(raw, path, None)
        not_null = self.str_list(sec, (*path, "not_null"), ())
        one_of: dict[str, tuple[Any, ...]] = {}
        for column, value in sec.items():
            if column == "not_null":
                continue
            values = value if isinstance(value, list) else [value]
            if not values:
                self.fail((*path, column), "is an empty array, so no row could pass; list the "
                          "values to keep, or remove the key")
            for i, v in enumerate(values):
                if not isinstance(v, (str, int, float, bool, datetime, date)):
                    self.fail((*path, column, i) if isinstance(value, list) else (*path, column),
                              f"must be a string, number, boolean or date, got {type_name(v)}")
            one_of[column] = tuple(values)
        return FilterConfig(one_of=MappingProxyType(one_of), not_null=not_null)

    def chunks(self, raw: object, path: tuple[str, ...]) -> ChunkConfig:
        sec = self.section(raw, path, ("size", "overlap"))
        size = self.integer(sec, (*path, "size"), None, 1)
        overlap = self.integer(sec, (*path, "overlap"), 0, 0)
        if overlap >= size:
            self.fail((*path, "overlap"), f"is {overlap}, not less than size ({size}); "
                      "make it smaller than size (about a tenth of it is usual)")
        return ChunkConfig(size=size, overlap=overlap)
