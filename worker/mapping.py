"""Mappers: how one changed source row becomes the `IndexDoc`s that represent it.

This module owns the one registry of mappers, keyed by "schema.table", and the
contract every mapper keeps, whether declared in TOML (`TomlMapper`) or written in
Python (`@register("schema.table")`, or `python = "pkg.mod:func"` in the table's
TOML section):

* A mapper is called as `mapper(row, op)`: `row` is the full decoded row, a
  read-only mapping of column name to Python value (see `pgtypes` for the types),
  and `op` is "insert", "update" or "snapshot". The row never holds the UNCHANGED
  marker: the worker merges unchanged TOAST values in before it calls the mapper.
  Mappers never see deletes; the worker removes what a row produced from its own
  record of the keys it wrote.
* It returns a list of `IndexDoc`s: all the documents this row should have now,
  possibly none (`[]`: index nothing, e.g. a filtered-out row). The worker removes
  documents the row produced before and no longer produces.
* Anything it raises, and any return value that is not a list of `IndexDoc`s with
  distinct keys, reaches the worker as `MapperError` (the original exception
  chained), so the worker can dead-letter that row and go on (DESIGN, Guarantee 2).
  `Registry.map` is the call site that enforces this.

Object ids. The TOML mapper makes an object id from `id_columns` (default: the
table's replica identity, filled in by `Registry.resolve`). One column: the value
as text (`templates.to_text`; bytea as hex). Several: each value's text with `\\`
written `\\\\` and `:` written `\\:`, joined with `:` — so ("a:b", "c") is
`a\\:b:c` and ("a", "b:c") is `a:b\\:c`, never the same id. A NULL or empty id is a
`MapperError`.

Chunks. An `IndexDoc`'s key is (object_type, object_id, node_kind), so an object has
at most one row per node kind and cannot hold several `chunk` rows. With
`[tables."x".chunks]`, a body longer than `size` characters therefore yields, besides
the object's own document (which keeps the whole body, or its first
`max_body_chars` characters cut at whitespace when that is set), chunk documents that are
objects of their own: object_id `f"{id}~{n}"` (n = 0, 1, …), node_kind "chunk",
the chunk's text as body, no title and no keywords (so a title word does not match
every chunk), the object's partition, attrs and embed_spaces, and its payload plus
`parent_id` (the object's id), `chunk_index` (n) and `chunk_start` (the chunk's
character offset in the body). A body longer than `size` always splits into two or
more chunks, so there is no one-chunk case keyed like its object. The suffix is
always `~` and decimal digits, so chunk ids of different objects never coincide; a
chunk id can equal the id of an object whose own id ends in `~<digits>`, but the
keys still differ by node_kind. The limitation: search's collapse groups by
(object_type, object_id), so a chunk is a separate hit from its object; group by
`payload["parent_id"]`, or search `node_kinds=["leaf"]` or `["chunk"]` on their
own. Deleting by (object_type, object_id) without a node kind does not reach the
chunks: the worker deletes each key it recorded.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, time
from types import MappingProxyType
from typing import Any, Protocol, TypeVar, runtime_checkable

from slipstream.index.doc import IndexDoc
from slipstream.index.errors import SlipstreamError, ValidationError

from .config import CHUNK_PAYLOAD_KEYS, TableConfig, WorkerConfig
from .pgoutput import UNCHANGED
from .templates import Template, json_safe, split_chunks, to_text
from .tomlreader import ConfigError, key_path

__all__ = [
    "DEFAULT_REGISTRY", "OPS", "Mapper", "MapperError", "Registry", "TomlMapper", "object_id",
    "register",
]

OPS = ("insert", "update", "snapshot")


class MapperError(SlipstreamError):
    """A mapper failed on one row (the cause is chained); the worker dead-letters the row."""

    def __init__(self, message: str, *, table: str | None = None) -> None:
        super().__init__(message)
        self.table = table


@runtime_checkable
class Mapper(Protocol):
    """Turns one row into the documents that represent it (see the module docstring)."""

    def __call__(self, row: Mapping[str, object], op: str) -> list[IndexDoc]: ...


M = TypeVar("M", bound=Callable[..., Any])


def _id_part(value: object) -> str:
    if value is None:
        raise ValueError("an id column is NULL")
    text = value.hex() if isinstance(value, (bytes, bytearray, memoryview)) else to_text(value)
    if not text:
        raise ValueError("an id column is empty")
    return text


def object_id(values: Sequence[object]) -> str:
    """The object id for the id columns' values (see the module docstring)."""
    if len(values) == 1:
        return _id_part(values[0])
    return ":".join(_id_part(v).replace("\\", "\\\\").replace(":", "\\:") for v in values)


def _same(value: object, allowed: object) -> bool:
    """Whether a row value equals a filter value from TOML (typed as TOML types are)."""
    if value is None:
        return False
    if isinstance(value, bool) or isinstance(allowed, bool):
        return isinstance(value, bool) and isinstance(allowed, bool) and value == allowed
    if value == allowed:
        return True
    try:
        return json_safe(value) == allowed
    except TypeError:
        return False


class TomlMapper:
    """The mapper a `[tables."schema.table"]` section declares (see `config.TableConfig`).

    Until `id_columns` are known (from the configuration or, via `resolved()`, from the
    table's replica identity) calling it raises `MapperError`.
    """

    def __init__(self, config: TableConfig, *, id_columns: Sequence[str] | None = None) -> None:
        if config.python is not None:
            raise ConfigError(f"{config.table} is mapped by {config.python}, not by templates",
                              path=key_path("tables", config.table, "python"), source=config.origin)
        self.config = config
        self.id_columns = tuple(id_columns or config.id_columns)
        self._partition_columns = config.partition.columns  # read once, checked per row

    def __repr__(self) -> str:
        return f"TomlMapper({self.config.table!r}, id_columns={self.id_columns!r})"

    @property
    def table(self) -> str:
        return self.config.table

    def resolved(self, columns: Collection[str], key_columns: Sequence[str],
                 unpublished: Collection[str] = (),
                 unique: Sequence[Sequence[str]] = ()) -> TomlMapper:
        """This mapper checked against the table's columns, with id columns filled in.

        `key_columns` are the replica identity columns, used when the configuration
        names no `id_columns`; `unpublished`, the table's generated columns the stream
        does not carry; `unique`, the column sets the table keeps unique: configured
        `id_columns` must hold one of them when there are any, or two rows would share a
        document (and deleting either would delete it). Raises `ConfigError` naming the
        key that is wrong.
        """
        self.config.check_columns(columns, unpublished)
        own = self.config.id_columns
        if own and unique and not any(set(u) <= set(own) for u in unique):
            raise ConfigError(
                f"{list(own)} need not identify a row of {self.table}: no primary key or unique "
                f"index lies within them (unique: {', '.join(map(str, map(list, unique)))}), so "
                "two rows could share one document, and deleting either would delete it; name "
                "columns that hold one of those, or make these unique (CREATE UNIQUE INDEX ON "
                f"{self.table} ({', '.join(own)}))",
                path=key_path("tables", self.table, "id_columns"), source=self.config.origin)
        ids = own or tuple(key_columns)
        if not ids:
            raise ConfigError(
                f"{self.table} has no primary key or replica identity, so rows have no id; set "
                "id_columns = [...] to columns that identify a row (and give the table a "
                "primary key or REPLICA IDENTITY, or deletes cannot be followed)",
                path=key_path("tables", self.table, "id_columns"), source=self.config.origin)
        return TomlMapper(self.config, id_columns=ids)

    def __call__(self, row: Mapping[str, object], op: str) -> list[IndexDoc]:
        try:
            return self._map(row)
        except ValidationError as exc:
            raise MapperError(f"{self.config.path}: the row maps to an invalid document: {exc}",
                              table=self.table) from exc

    # -- the parts ------------------------------------------------------------------------

    def _value(self, row: Mapping[str, object], column: str, *key: str) -> object:
        try:
            return row[column]
        except KeyError:
            raise MapperError(
                f"{key_path('tables', self.table, *key)}: the row has no column {column!r} "
                f"(it has {', '.join(map(repr, row))}); fix the configuration to name an "
                "existing column", table=self.table) from None

    def _render(self, row: Mapping[str, object], name: str) -> str:
        template: Template = getattr(self.config, name)
        try:
            return template.render(row)
        except KeyError as exc:  # a column the row lacks: the same error `_value` gives
            self._value(row, exc.args[0], name)
            raise
        except TypeError as exc:
            raise MapperError(f"{key_path('tables', self.table, name)}: {exc}",
                              table=self.table) from exc

    def _json(self, row: Mapping[str, object], name: str) -> dict[str, object]:
        out: dict[str, object] = {}
        for column in getattr(self.config, name):
            try:
                out[column] = json_safe(self._value(row, column, name))
            except TypeError as exc:
                raise MapperError(f"{key_path('tables', self.table, name)}: column {column!r}: "
                                  f"{exc}", table=self.table) from exc
        return out

    def _passes(self, row: Mapping[str, object]) -> bool:
        f = self.config.filter
        if f is None:
            return True
        if any(self._value(row, c, "filter", "not_null") is None for c in f.not_null):
            return False
        return all(any(_same(self._value(row, c, "filter", c), a) for a in allowed)
                   for c, allowed in f.one_of.items())

    def _keywords(self, row: Mapping[str, object]) -> list[str]:
        found: dict[str, None] = {}  # ordered and without repeats

        def add(value: object) -> None:
            if isinstance(value, (list, tuple)):
                for item in value:
                    add(item)
            elif value is not None:
                text = to_text(value)
                if text.strip():
                    found[text] = None

        for column in self.config.keywords:
            try:
                add(self._value(row, column, "keywords"))
            except TypeError as exc:
                raise MapperError(f"{key_path('tables', self.table, 'keywords')}: column "
                                  f"{column!r}: {exc}", table=self.table) from exc
        return list(found)

    def _map(self, row: Mapping[str, object]) -> list[IndexDoc]:
        cfg = self.config
        if not self.id_columns:
            raise MapperError(
                f"{key_path('tables', self.table, 'id_columns')}: not known yet; set id_columns, "
                "or resolve the mapper against the table's replica identity first",
                table=self.table)
        if not self._passes(row):
            return []
        try:
            oid = object_id([self._value(row, c, "id_columns") for c in self.id_columns])
        except (ValueError, TypeError) as exc:
            raise MapperError(f"{key_path('tables', self.table, 'id_columns')} "
                              f"{list(self.id_columns)}: {exc}", table=self.table) from exc
        partition = self._render(row, "partition")
        # A partition names the tenant whose devices read the row: a NULL or empty column
        # names none, and "user-{owner_id}" would put every such row of every tenant in
        # one partition "user-".
        missing = [c for c in self._partition_columns if to_text(row[c]) == ""]
        if missing or not partition:
            raise MapperError(
                f"{key_path('tables', self.table, 'partition')}: {cfg.partition.source!r} "
                + (f"needs column {missing[0]!r}, which is NULL or empty for this row"
                   if missing else "renders empty for this row")
                + ", and a partition names the tenant whose devices read the row; add the "
                "column to filter.not_null to leave such rows out, or give them a partition "
                "in a Python mapper", table=self.table)
        updated_at = None
        if cfg.updated_at is not None:
            updated_at = self._value(row, cfg.updated_at, "updated_at")
            if isinstance(updated_at, date) and not isinstance(updated_at, datetime):
                updated_at = datetime.combine(updated_at, time.min, UTC)  # a day: its start, UTC
            if updated_at is not None and not isinstance(updated_at, datetime):
                raise MapperError(
                    f"{key_path('tables', self.table, 'updated_at')}: column {cfg.updated_at!r} "
                    f"holds a {type(updated_at).__name__}, not a timestamp", table=self.table)
        title, body = self._render(row, "title"), self._render(row, "body")
        keywords, payload = self._keywords(row), self._json(row, "payload")
        common: dict[str, Any] = {
            "object_type": cfg.object_type, "partition": partition,
            "attrs": self._json(row, "attrs"), "embed_spaces": cfg.spaces,
            "source_updated_at": updated_at}
        own = body
        if cfg.max_body_chars is not None and len(body) > cfg.max_body_chars:
            # The first piece a chunking of that size would cut (at whitespace).
            own = split_chunks(body[:cfg.max_body_chars + 1], cfg.max_body_chars, 0)[0][1]
        docs = [IndexDoc(object_id=oid, node_kind=cfg.node_kind, title=title, body=own,
                         keywords=keywords, payload=payload, **common)]
        if cfg.chunks is not None and len(body) > cfg.chunks.size:
            for n, (start, piece) in enumerate(
                    split_chunks(body, cfg.chunks.size, cfg.chunks.overlap)):
                extra = dict(zip(CHUNK_PAYLOAD_KEYS, (oid, n, start), strict=True))
                docs.append(IndexDoc(object_id=f"{oid}~{n}", node_kind="chunk", body=piece,
                                     payload={**payload, **extra}, **common))
        return docs


def _describe(mapper: object) -> str:
    """A mapper's name for messages: module.qualname, or its class for other callables."""
    module = getattr(mapper, "__module__", None) or "?"
    name = getattr(mapper, "__qualname__", None) or type(mapper).__qualname__
    return f"{module}.{name}"


class Registry:
    """Mappers by "schema.table". Adding a second, different mapper for a table is a ConfigError."""

    def __init__(self) -> None:
        self._mappers: dict[str, Mapper] = {}
        self._origins: dict[str, str] = {}

    def __contains__(self, table: object) -> bool:
        return table in self._mappers

    def __len__(self) -> int:
        return len(self._mappers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tables())

    def tables(self) -> tuple[str, ...]:
        """The tables that have a mapper, sorted."""
        return tuple(sorted(self._mappers))

    def get(self, table: str) -> Mapper | None:
        """The mapper for `table`, or None."""
        return self._mappers.get(table)

    def fingerprint(self, table: str) -> str | None:
        """What decides `table`'s documents, as recorded with its copy: a TOML section's
        hash, or a Python mapper's name (its code is not seen: after changing it, copy
        the table again with `slipstream setup --recopy`). None for an unmapped table."""
        mapper = self._mappers.get(table)
        if mapper is None:
            return None
        if isinstance(mapper, TomlMapper):
            return "toml:" + mapper.config.fingerprint()
        return "python:" + _describe(mapper)

    def origin(self, table: str) -> str:
        """Where the table's mapper was declared (for messages and logs)."""
        return self._origins[table]

    def register(self, table: str, mapper: M | None = None, *,
                 origin: str | None = None) -> Any:
        """Add `mapper` for `table`; without `mapper`, a decorator that adds the function."""
        schema, dot, name = table.partition(".") if isinstance(table, str) else ("", "", "")
        if not (schema and dot and name) or "." in name:
            raise ConfigError(f"{table!r} is not a table name; register mappers under "
                              '"schema.table", e.g. @register("public.notes")')
        if mapper is None:
            def decorator(func: M) -> M:
                self.add(table, func, origin=origin)
                return func
            return decorator
        self.add(table, mapper, origin=origin)
        return mapper

    def add(self, table: str, mapper: Callable[..., Any], *, origin: str | None = None) -> None:
        """Add `mapper` for `table` (see `register`, which also checks the table name)."""
        origin = origin or _describe(mapper)
        if not callable(mapper):
            raise ConfigError(f"the mapper for {table} ({origin}) is not callable")
        try:
            inspect.signature(mapper).bind({}, "insert")
        except TypeError:
            raise ConfigError(f"the mapper for {table} ({origin}) cannot be called as "
                              "mapper(row, op); give it exactly those two parameters") from None
        except ValueError:  # no signature to inspect (some builtins); the call will tell
            pass
        existing = self._mappers.get(table)
        if existing is not None and existing is not mapper:
            raise ConfigError(
                f"{table} is mapped twice: by {self._origins[table]} and by {origin}; keep one "
                "(a table is mapped either in TOML or by one Python function)",
                path=key_path("tables", table))
        self._mappers[table] = mapper
        self._origins.setdefault(table, origin)

    def resolve(self, table: str, columns: Collection[str], key_columns: Sequence[str],
                *, unpublished: Collection[str] = (), unique: Sequence[Sequence[str]] = ()) -> None:
        """Check a TOML mapper against the table's columns and fill in its id columns
        (see `TomlMapper.resolved`).

        The worker calls this once it knows the table (from the catalog or a Relation
        message); Python mappers are left as they are. Raises `ConfigError`.
        """
        mapper = self._mappers.get(table)
        if isinstance(mapper, TomlMapper):
            self._mappers[table] = mapper.resolved(columns, key_columns, unpublished, unique)

    def map(self, table: str, row: Mapping[str, object], op: str) -> list[IndexDoc]:
        """Run the table's mapper on one row; every failure is a `MapperError`."""
        if op not in OPS:
            raise ValidationError(f"op must be one of {OPS}, got {op!r} (deletes are not mapped)")
        if not isinstance(row, Mapping):
            raise ValidationError(f"row must be a mapping, got {type(row).__name__}")
        unchanged = [c for c, v in row.items() if v is UNCHANGED]
        if unchanged:
            raise ValidationError(
                f"row for {table} still holds UNCHANGED for {', '.join(unchanged)}; merge the "
                "stored values of unchanged TOAST columns before mapping")
        mapper = self._mappers.get(table)
        if mapper is None:
            raise ConfigError(f"no mapper for {table}; add a [tables.\"{table}\"] section or "
                              f'@register("{table}") a function in a worker.mapper_modules module',
                              path=key_path("tables", table))
        view = MappingProxyType(row) if isinstance(row, dict) else row
        origin = self._origins[table]
        try:
            result = mapper(view, op)
        except MapperError as exc:
            exc.table = exc.table or table
            raise
        except Exception as exc:
            raise MapperError(f"the mapper for {table} ({origin}) raised "
                              f"{type(exc).__name__}: {exc}", table=table) from exc
        if not isinstance(result, (list, tuple)) or not all(
                isinstance(d, IndexDoc) for d in result):
            got = type(result).__name__ if not isinstance(result, (list, tuple)) else \
                "a list holding " + ", ".join(sorted({type(d).__name__ for d in result}))
            raise MapperError(f"the mapper for {table} ({origin}) returned {got}; it must return "
                              "a list of IndexDoc ([] to index nothing)", table=table)
        keys = [d.key for d in result]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise MapperError(f"the mapper for {table} ({origin}) returned the key {dup} twice; "
                              "each document of a row needs its own (object_type, object_id, "
                              "node_kind)", table=table)
        return list(result)

    @classmethod
    def from_config(cls, config: WorkerConfig, *, python: Registry | None = None) -> Registry:
        """The registry for a worker: TOML tables, `python =` references, and `@register`s.

        Imports each of `worker.mapper_modules` first, so that their `@register` calls
        land in `python` (default: `DEFAULT_REGISTRY`), whose mappers are then added.
        A table mapped both in TOML and in Python, or by nothing at all, is a ConfigError.
        """
        for i, module in enumerate(config.worker.mapper_modules):
            _import(module, key_path("worker", "mapper_modules", i), config.origin)
        registry = cls()
        for table, tcfg in config.tables.items():
            if tcfg.python is None:
                registry.add(table, TomlMapper(tcfg),
                             origin=f"{key_path('tables', table)} in {config.origin}")
                continue
            path = key_path("tables", table, "python")
            func = _resolve_ref(tcfg.python, path, config.origin)
            try:
                registry.add(table, func, origin=f"{path} = {tcfg.python!r} in {config.origin}")
            except ConfigError as exc:
                raise ConfigError(exc.problem, path=path, source=config.origin) from None
        source = DEFAULT_REGISTRY if python is None else python
        for table in source.tables():
            try:
                registry.add(table, source._mappers[table], origin=source.origin(table))
            except ConfigError as exc:
                raise ConfigError(exc.problem, path=exc.path, source=config.origin) from None
        if not registry:
            raise ConfigError('nothing to index: add a [tables."schema.table"] section, or list '
                              "a module that uses @register in worker.mapper_modules",
                              path="tables", source=config.origin)
        return registry


def _import(module: str, path: str, origin: str) -> Any:
    try:
        return importlib.import_module(module)
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            raise ConfigError(f"cannot import {module!r}: {exc}; install it or add its "
                              "directory to PYTHONPATH", path=path, source=origin) from exc
        raise ConfigError(f"importing {module!r} failed: {exc}", path=path, source=origin) from exc
    except Exception as exc:
        raise ConfigError(f"importing {module!r} raised {type(exc).__name__}: {exc}; fix the "
                          "module", path=path, source=origin) from exc


def _resolve_ref(ref: str, path: str, origin: str) -> Callable[..., Any]:
    module_name, _, attr = ref.partition(":")
    target: Any = _import(module_name, path, origin)
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"{module_name!r} has no attribute {attr!r}; check the function "
                              "name", path=path, source=origin) from None
    if not callable(target):
        raise ConfigError(f"{ref!r} is a {type(target).__name__}, not a function",
                          path=path, source=origin)
    return target


DEFAULT_REGISTRY = Registry()


def register(table: str) -> Callable[[M], M]:
    """Decorator: map rows of `table` ("schema.table") with this function, in DEFAULT_REGISTRY."""
    return DEFAULT_REGISTRY.register(table)
