"""The worker's configuration: frozen dataclasses read from one TOML file.

This module owns what a configuration file may say and every check made on it
before the worker connects anywhere: `load_config(path)` and `parse_config(data)`
return a `WorkerConfig` or raise `ConfigError`, whose message starts with the file
and the exact key path (`tables."public.notes".title`) and ends with the fix.
Unknown keys are refused, with a "did you mean" suggestion.

Secrets never reach a log through this module: `WorkerConfig.redacted()` is a twin
with passwords in DSNs and API keys replaced by `***`, `safe_dict()` is that twin as
plain JSON-able data, and the `repr` of every section that can hold a secret shows
the redacted form. DSNs and API keys named by `*_env` keys are read from the
environment only when asked (`resolve_dsn`, `resolve_api_key`), so a file can be
checked where the secrets are not set.

Checks that need the source database's catalog (id columns defaulting to the
replica identity, template columns that exist) are made later, by
`TableConfig.check_columns`, when the worker knows the table's columns.
`deploy/slipstream.example.toml` is a commented example of every section.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from slipstream.index.doc import IDENTIFIER
from slipstream.index.pg_connect import NO_TIMEOUTS, SESSION_SETTINGS, pinned_conninfo

from .table_config import (
    CHUNK_PAYLOAD_KEYS,
    ChunkConfig,
    FilterConfig,
    TableConfig,
    TableReader,
)
from .templates import Template, json_safe
from .tomlreader import (
    MISSING,
    ConfigError,
    did_you_mean,
    key_path,
)

__all__ = [
    "CHUNK_PAYLOAD_KEYS", "ChunkConfig", "ConfigError", "EmbedderConfig", "FilterConfig",
    "SearchConfig", "SourceConfig", "SyncSettings", "TableConfig", "WorkerConfig", "WorkerSettings",
    "key_path", "load_config", "parse_config", "redact_dsn",
]

REDACTED = "***"
# Payload keys the TOML mapper sets on chunk nodes; a table with chunks may not copy
# columns of these names into its payload.
_SLOT = re.compile(r"[a-z0-9_]{1,63}")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_URI_DSN = re.compile(r"postgres(?:ql)?://", re.IGNORECASE)
_KV_SECRET = re.compile(r"(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)", re.IGNORECASE)
_QUERY_SECRET = re.compile(r"([?&](?:ssl)?password=)[^&#]*", re.IGNORECASE)
_URL_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)([^@/?#:]*):[^@]*@", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """`dsn` with any password replaced by ***, in URI or key=value form."""
    if _URI_DSN.match(dsn):
        scheme, rest = dsn.split("://", 1)
        before_query, sep, query = rest.partition("?")
        userinfo, at, hosts = before_query.rpartition("@")
        if at and ":" in userinfo:
            before_query = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{hosts}"
        return _QUERY_SECRET.sub(lambda m: m[1] + REDACTED, f"{scheme}://{before_query}{sep}{query}")
    return _KV_SECRET.sub(lambda m: m[1] + REDACTED, dsn)


def _redact_url(url: str) -> str:
    return _URL_USERINFO.sub(lambda m: f"{m[1]}{m[2]}:{REDACTED}@", url)


_NOT_LIBPQ = ("not a valid libpq connection string or URI (use postgresql://user@host/db "
              "or key=value pairs: host=… dbname=…)")


def _parses(dsn: str) -> bool:
    """True when libpq can parse `dsn`; the text is never echoed (it may hold a password)."""
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return False
    return True


def _env(name: str, path: str, source: str, environ: Mapping[str, str] | None) -> str:
    value = (os.environ if environ is None else environ).get(name)
    if not value:
        raise ConfigError(f"environment variable {name} is not set (or empty); export it "
                          "before starting the worker", path=path, source=source)
    return value


def _env_dsn(name: str, path: str, source: str, environ: Mapping[str, str] | None) -> str:
    """The DSN in the environment variable `name`, checked as `dsn_pair` checks a literal one."""
    value = _env(name, path, source, environ)
    if not _parses(value):
        raise ConfigError(f"environment variable {name} holds a value that is {_NOT_LIBPQ}",
                          path=path, source=source)
    return value


# -- the sections ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SourceConfig:
    """[source]: the application database, its replication slot and publication."""

    dsn: str | None = None
    dsn_env: str | None = None
    slot: str = "slipstream"
    publication: str = "slipstream"
    origin: str = dataclasses.field(default="<string>", repr=False, compare=False)

    def resolve_dsn(self, environ: Mapping[str, str] | None = None) -> str:
        """The DSN: `dsn`, or the value of the environment variable `dsn_env` names."""
        if self.dsn is not None:
            return self.dsn
        assert self.dsn_env is not None
        return _env_dsn(self.dsn_env, "source.dsn_env", self.origin, environ)

    def redacted(self) -> SourceConfig:
        return dataclasses.replace(self, dsn=None if self.dsn is None else redact_dsn(self.dsn))

    def __repr__(self) -> str:
        r = self.redacted()
        return (f"SourceConfig(dsn={r.dsn!r}, dsn_env={r.dsn_env!r}, slot={r.slot!r}, "
                f"publication={r.publication!r})")


DEFAULT_EMBED_CACHE_ROWS = 100_000


@dataclass(frozen=True, slots=True)
class SearchConfig:
    """[search]: where the search schema lives; with no DSN, in the source database."""

    dsn: str | None = None
    dsn_env: str | None = None
    schema: str = "slipstream"
    exact_limit: int = 20000
    hnsw: bool = True
    # Content-hash cache entries per space; 0 = off; None = by embedder (see `cache_rows`).
    embed_cache_rows: int | None = None
    origin: str = dataclasses.field(default="<string>", repr=False, compare=False)

    def resolve_dsn(self, source: SourceConfig, environ: Mapping[str, str] | None = None) -> str:
        """This section's DSN if it has one, else the source database's; either with the
        session settings every search connection pins and no application time limits
        (`pinned_conninfo`, `NO_TIMEOUTS`): the worker, `serve` and the CLI use it."""
        if self.dsn is not None:
            dsn = self.dsn
        elif self.dsn_env is not None:
            dsn = _env_dsn(self.dsn_env, "search.dsn_env", self.origin, environ)
        else:
            dsn = source.resolve_dsn(environ)
        return pinned_conninfo(dsn, SESSION_SETTINGS + NO_TIMEOUTS)

    def redacted(self) -> SearchConfig:
        return dataclasses.replace(self, dsn=None if self.dsn is None else redact_dsn(self.dsn))

    def __repr__(self) -> str:
        r = self.redacted()
        return (f"SearchConfig(dsn={r.dsn!r}, dsn_env={r.dsn_env!r}, schema={r.schema!r}, "
                f"exact_limit={r.exact_limit!r}, hnsw={r.hnsw!r})")


@dataclass(frozen=True, slots=True)
class EmbedderConfig:
    """[embedders.<space>]: `hashing` (HashingEmbedder(dim)) or `http` (OpenAI-compatible)."""

    space: str
    dim: int
    kind: str = "hashing"
    url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    api_key: str | None = None
    batch_size: int = 64
    timeout: float = 30.0
    # How the client treats the service (kind = "http"): see worker/embedders.py.
    concurrency: int = 4
    max_batch_tokens: int = 100_000
    max_input_tokens: int = 8191
    dimensions: int | None = None
    max_retries: int = 5
    retry_initial_delay: float = 0.5
    retry_max_delay: float = 8.0
    retry_budget_seconds: float = 10.0
    breaker_failures: int = 5
    breaker_reset_seconds: float = 10.0
    origin: str = dataclasses.field(default="<string>", repr=False, compare=False)

    def resolve_api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The API key: `api_key`, or the variable `api_key_env` names, or None (no auth)."""
        if self.api_key is not None or self.api_key_env is None:
            return self.api_key
        return _env(self.api_key_env, key_path("embedders", self.space, "api_key_env"),
                    self.origin, environ)

    def redacted(self) -> EmbedderConfig:
        return dataclasses.replace(
            self, api_key=None if self.api_key is None else REDACTED,
            url=None if self.url is None else _redact_url(self.url))

    def __repr__(self) -> str:
        r = self.redacted()
        return (f"EmbedderConfig(space={r.space!r}, dim={r.dim!r}, kind={r.kind!r}, url={r.url!r}, "
                f"model={r.model!r}, api_key_env={r.api_key_env!r}, api_key={r.api_key!r}, "
                f"batch_size={r.batch_size!r}, timeout={r.timeout!r}, "
                f"concurrency={r.concurrency!r}, dimensions={r.dimensions!r})")


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """[worker]: batching, status updates, heartbeat, HTTP endpoint, mapper modules, snapshot."""

    batch_max_changes: int = 2000
    batch_max_bytes: int = 8 * 1024 * 1024
    batch_max_seconds: float = 0.25
    status_interval_seconds: float = 10.0
    heartbeat_seconds: float = 0.0
    http_port: int = 9187
    metrics_interval_seconds: float = 5.0
    mapper_modules: tuple[str, ...] = ()
    snapshot_chunk_rows: int = 5000
    compact_interval_seconds: float = 3600.0  # 0 = never (run `slipstream compact` instead)
    tombstone_retention_seconds: float = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """[sync]: the device sync server (`slipstream serve`) and its device tokens.

    Tokens are verified with the HS256 secret in the environment variable
    `token_secret_env`, or, when `public_key_file` is set, with that PEM public key
    (`algorithm` EdDSA or RS256). `audience`, when set, must be the tokens' `aud`.
    `token_leeway_seconds` forgives that much clock difference between whoever mints
    tokens and this server, on `exp` and on an `iat` or `nbf` in the future.
    `spaces` are the embedding spaces a device gets when it asks for none.
    `snapshot_cache_mb` bounds the disk each `serve` process keeps exported shards in, to
    answer the next snapshot request for the same partitions by bringing one forward
    (0: export every time). `metrics_port` serves the server's Prometheus `/metrics` on
    the `listen` address, apart from the devices' port (0: not served).
    """

    listen: str = "127.0.0.1"
    port: int = 8765
    token_secret_env: str = "SLIPSTREAM_TOKEN_SECRET"
    public_key_file: str | None = None
    algorithm: str = "HS256"
    audience: str | None = None
    token_leeway_seconds: int = 60
    spaces: tuple[str, ...] | None = None
    snapshot_cache_mb: int = 1024
    metrics_port: int = 9188
    origin: str = dataclasses.field(default="<string>", repr=False, compare=False)

    def token_key(self, environ: Mapping[str, str] | None = None) -> str | bytes:
        """The key that verifies tokens: the PEM public key file's bytes, or the secret."""
        if self.public_key_file is not None:
            try:
                return Path(self.public_key_file).read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read {self.public_key_file!r}: {exc}; point it at "
                                  "the PEM public key tokens are verified with",
                                  path="sync.public_key_file", source=self.origin) from exc
        return _env(self.token_secret_env, "sync.token_secret_env", self.origin, environ)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """The whole file. `origin` is where it was read from (for messages)."""

    source: SourceConfig
    search: SearchConfig = SearchConfig()
    spaces: Mapping[str, int] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    embedders: Mapping[str, EmbedderConfig] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))
    worker: WorkerSettings = WorkerSettings()
    sync: SyncSettings = SyncSettings()
    tables: Mapping[str, TableConfig] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))
    origin: str = "<string>"

    def embed_cache_rows(self) -> int:
        """The content-hash cache size per space: `[search] embed_cache_rows` when set; else
        off when every space's embedder computes its vectors locally from the text (kind
        `hashing`: recomputing costs less than a lookup and a write on the search
        database), and `DEFAULT_EMBED_CACHE_ROWS` otherwise."""
        if self.search.embed_cache_rows is not None:
            return self.search.embed_cache_rows
        if all(e.kind == "hashing" for e in self.embedders.values()):
            return 0
        return DEFAULT_EMBED_CACHE_ROWS

    def redacted(self) -> WorkerConfig:
        """A twin with DSN passwords and API keys replaced by ***, safe to log."""
        return dataclasses.replace(
            self, source=self.source.redacted(), search=self.search.redacted(),
            embedders=MappingProxyType({k: e.redacted() for k, e in self.embedders.items()}))

    def safe_dict(self) -> dict[str, Any]:
        """The redacted configuration as plain JSON-able data (dicts, lists, scalars)."""
        return _plain(self.redacted())


def _plain(value: Any) -> Any:
    if isinstance(value, Template):
        return value.source
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name != "origin"}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    return json_safe(value)


# -- reading ---------------------------------------------------------------------------------

def load_config(path: str | os.PathLike[str]) -> WorkerConfig:
    """Read and check the TOML file at `path`."""
    source = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("the configuration file does not exist; pass the path of a TOML file "
                          "(see deploy/slipstream.example.toml)", source=source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the configuration file: {exc}", source=source) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=source) from None
    return parse_config(data, source=source)


def parse_config(data: Mapping[str, Any], *, source: str = "<string>") -> WorkerConfig:
    """Check already-parsed TOML data and build the `WorkerConfig`."""
    r = _Reader(source)
    top = r.section(data, (), ("source", "search", "spaces", "embedders", "worker", "sync",
                                 "tables"))
    if "source" not in top:
        r.fail(("source",), 'missing section; add [source] with dsn = "postgresql://…" '
               'or dsn_env = "APP_DATABASE_URL"')
    src = r.section(top["source"], ("source",), ("dsn", "dsn_env", "slot", "publication"))
    dsn, dsn_env = r.dsn_pair(src, ("source",), required=True)
    source_cfg = SourceConfig(
        dsn=dsn, dsn_env=dsn_env, origin=source,
        slot=r.name(src, ("source", "slot"), "slipstream", _SLOT,
                    "lower-case letters, digits and underscores, at most 63 characters"),
        publication=r.identifier(src, ("source", "publication"), "slipstream"))

    sea = r.section(top.get("search", {}), ("search",),
                    ("dsn", "dsn_env", "schema", "exact_limit", "hnsw", "embed_cache_rows"))
    dsn, dsn_env = r.dsn_pair(sea, ("search",), required=False)
    search_cfg = SearchConfig(
        dsn=dsn, dsn_env=dsn_env, origin=source,
        schema=r.identifier(sea, ("search", "schema"), "slipstream"),
        exact_limit=r.integer(sea, ("search", "exact_limit"), 20000, minimum=1),
        hnsw=r.get(sea, ("search", "hnsw"), True, (bool,), "true or false"),
        embed_cache_rows=(r.integer(sea, ("search", "embed_cache_rows"), None, minimum=0)
                          if "embed_cache_rows" in sea else None))

    raw_spaces = r.section(top.get("spaces", {}), ("spaces",), None)
    spaces: dict[str, int] = {}
    for name in raw_spaces:
        r.check_name(name, ("spaces", name), "an embedding space name", IDENTIFIER)
        spaces[name] = r.integer(raw_spaces, ("spaces", name), None, minimum=1, maximum=16000)

    raw_embedders = r.section(top.get("embedders", {}), ("embedders",), None)
    embedders = {name: r.embedder(raw_embedders[name], name, spaces) for name in raw_embedders}
    for name in spaces:
        if name not in embedders:
            r.fail(("spaces", name), f'this space has no embedder; add [embedders.{name}] with '
                   f'kind = "hashing" or kind = "http", or remove the space')

    wrk = r.section(top.get("worker", {}), ("worker",),
                    [f.name for f in dataclasses.fields(WorkerSettings)])
    d = WorkerSettings()
    modules = r.str_list(wrk, ("worker", "mapper_modules"), ())
    for i, module in enumerate(modules):
        if not _MODULE.fullmatch(module):
            r.fail(("worker", "mapper_modules", i), f"{module!r} is not a module path; "
                   'write a dotted import path such as "myapp.search_mappers"')
    worker_cfg = WorkerSettings(
        batch_max_changes=r.integer(wrk, ("worker", "batch_max_changes"), d.batch_max_changes, 1),
        batch_max_bytes=r.integer(wrk, ("worker", "batch_max_bytes"), d.batch_max_bytes, 1),
        batch_max_seconds=r.number(wrk, ("worker", "batch_max_seconds"), d.batch_max_seconds,
                                   positive=True),
        status_interval_seconds=r.number(wrk, ("worker", "status_interval_seconds"),
                                         d.status_interval_seconds, positive=True),
        heartbeat_seconds=r.number(wrk, ("worker", "heartbeat_seconds"), d.heartbeat_seconds),
        http_port=r.integer(wrk, ("worker", "http_port"), d.http_port, 0, maximum=65535),
        metrics_interval_seconds=r.number(wrk, ("worker", "metrics_interval_seconds"),
                                          d.metrics_interval_seconds, positive=True),
        mapper_modules=modules,
        snapshot_chunk_rows=r.integer(wrk, ("worker", "snapshot_chunk_rows"),
                                      d.snapshot_chunk_rows, 1),
        compact_interval_seconds=r.number(wrk, ("worker", "compact_interval_seconds"),
                                          d.compact_interval_seconds),
        tombstone_retention_seconds=r.number(wrk, ("worker", "tombstone_retention_seconds"),
                                             d.tombstone_retention_seconds))

    sync_cfg = r.sync(top.get("sync", {}), spaces)

    raw_tables = r.section(top.get("tables", {}), ("tables",), None)
    tables = {name: r.table(raw_tables[name], name, spaces) for name in raw_tables}
    owners: dict[str, str] = {}
    for name, tcfg in tables.items():
        if tcfg.python is None and owners.setdefault(tcfg.object_type, name) != name:
            r.fail(("tables", name, "object_type"), f"{tcfg.object_type!r} is also the object_type "
                   f"of {owners[tcfg.object_type]}; documents of two tables would share ids and "
                   "overwrite each other, so give each table its own object_type")
    return WorkerConfig(
        source=source_cfg, search=search_cfg, spaces=MappingProxyType(spaces),
        embedders=MappingProxyType(embedders), worker=worker_cfg, sync=sync_cfg,
        tables=MappingProxyType(tables), origin=source)


_EMBEDDER_KEYS = ("kind", "url", "model", "api_key_env", "api_key", "batch_size", "timeout",
                  "concurrency", "max_batch_tokens", "max_input_tokens", "dimensions",
                  "max_retries", "retry_initial_delay", "retry_max_delay",
                  "retry_budget_seconds", "breaker_failures", "breaker_reset_seconds")


class _Reader(TableReader):
    """The section-specific checks; the generic typed access is `TomlReader`'s."""

    def dsn_pair(self, sec: Mapping[str, Any], path: tuple[str, ...],
                 required: bool) -> tuple[str | None, str | None]:
        dsn = self.string(sec, (*path, "dsn"), None, 'a connection string ("postgresql://…")')
        dsn_env = self.env_name(sec, (*path, "dsn_env"))
        if dsn is not None and dsn_env is not None:
            self.fail((*path, "dsn"), "dsn and dsn_env are both set; keep one (dsn_env keeps "
                      "the password out of the file)")
        if required and dsn is None and dsn_env is None:
            self.fail((*path, "dsn"), 'missing; set dsn = "postgresql://user@host/db" or '
                      'dsn_env = "APP_DATABASE_URL" (an environment variable holding the DSN)')
        if dsn is not None and "://" in dsn and not _URI_DSN.match(dsn):
            self.fail((*path, "dsn"), f"{redact_dsn(dsn)!r} is not a Postgres DSN; use "
                      "postgresql://… or key=value form (host=… dbname=…)")
        if dsn is not None and not _parses(dsn):
            self.fail((*path, "dsn"), _NOT_LIBPQ)
        return dsn, dsn_env

    def sync(self, raw: object, spaces: Mapping[str, int]) -> SyncSettings:
        path: tuple[str, ...] = ("sync",)
        sec = self.section(raw, path, ("listen", "port", "token_secret_env", "public_key_file",
                                       "algorithm", "audience", "token_leeway_seconds", "spaces",
                                       "snapshot_cache_mb", "metrics_port"))
        d = SyncSettings()
        algorithm = self.string(sec, (*path, "algorithm"), d.algorithm, '"HS256", "EdDSA" or "RS256"')
        if algorithm not in ("HS256", "EdDSA", "RS256"):
            self.fail((*path, "algorithm"), f'{algorithm!r} is not supported; use "HS256" (with '
                      'token_secret_env) or "EdDSA"/"RS256" (with public_key_file)')
        key_file = self.string(sec, (*path, "public_key_file"), None, "a path to a PEM file")
        if (algorithm == "HS256") != (key_file is None):
            self.fail((*path, "public_key_file"), "HS256 tokens use token_secret_env and no key "
                      'file; EdDSA and RS256 need public_key_file (set algorithm = "EdDSA" '
                      "with a key file, or remove the key file)")
        return SyncSettings(
            listen=self.string(sec, (*path, "listen"), d.listen, "an address to bind"),
            port=self.integer(sec, (*path, "port"), d.port, 1, maximum=65535),
            token_secret_env=self.env_name(sec, (*path, "token_secret_env")) or d.token_secret_env,
            public_key_file=key_file, algorithm=algorithm,
            audience=self.string(sec, (*path, "audience"), None, "a string") or None,
            token_leeway_seconds=self.integer(sec, (*path, "token_leeway_seconds"),
                                              d.token_leeway_seconds, 0, maximum=3600),
            spaces=self.spaces(sec, (*path, "spaces"), spaces),
            snapshot_cache_mb=self.integer(sec, (*path, "snapshot_cache_mb"), d.snapshot_cache_mb, 0),
            metrics_port=self.integer(sec, (*path, "metrics_port"), d.metrics_port, 0, maximum=65535),
            origin=self.source)

    def embedder(self, raw: object, name: str, spaces: Mapping[str, int]) -> EmbedderConfig:
        path: tuple[str, ...] = ("embedders", name)
        if name not in spaces:
            self.fail(path, f"there is no space {name!r} in [spaces]; add `{name} = <dimension>` "
                      f"to [spaces] or remove this embedder{did_you_mean(name, spaces)}")
        sec = self.section(raw, path, _EMBEDDER_KEYS)
        kind = self.string(sec, (*path, "kind"), MISSING, '"hashing" or "http"')
        if kind not in ("hashing", "http"):
            self.fail((*path, "kind"), f'unknown kind {kind!r}; use "hashing" or "http"'
                      f"{did_you_mean(kind, ('hashing', 'http'))}")
        if kind == "hashing":
            for key in sec:
                if key != "kind":
                    self.fail((*path, key), 'only applies to kind = "http"; remove it')
            return EmbedderConfig(space=name, dim=spaces[name], origin=self.source)
        url = self.string(sec, (*path, "url"), MISSING, 'the endpoint URL ("https://…/v1")')
        if not re.match(r"https?://[^/\s]+", url):
            self.fail((*path, "url"), f"{_redact_url(url)!r} is not an http(s) URL")
        api_key = self.string(sec, (*path, "api_key"), None)
        api_key_env = self.env_name(sec, (*path, "api_key_env"))
        if api_key is not None and api_key_env is not None:
            self.fail((*path, "api_key"), "api_key and api_key_env are both set; keep "
                      "api_key_env (it keeps the key out of the file)")
        return EmbedderConfig(
            space=name, dim=spaces[name], kind="http", url=url, api_key=api_key,
            api_key_env=api_key_env, origin=self.source,
            model=self.string(sec, (*path, "model"), MISSING, "the model name"),
            batch_size=self.integer(sec, (*path, "batch_size"), 64, 1),
            timeout=self.number(sec, (*path, "timeout"), 30.0, positive=True),
            **self.embedder_client(sec, path, spaces[name]))

    def embedder_client(self, sec: Mapping[str, Any], path: tuple[str, ...], dim: int
                        ) -> dict[str, Any]:
        """The HTTP client's keys: concurrency, batching budget, retries, circuit breaker."""
        dimensions = None
        if "dimensions" in sec:
            dimensions = self.integer(sec, (*path, "dimensions"), None, 1)
            if dimensions != dim:
                self.fail((*path, "dimensions"), f"is {dimensions} but the space is {dim}-d; "
                          "set it to the space's dimension (or remove it)")
        return {
            "concurrency": self.integer(sec, (*path, "concurrency"), 4, 1, 64),
            "max_batch_tokens": self.integer(sec, (*path, "max_batch_tokens"), 100_000, 1),
            "max_input_tokens": self.integer(sec, (*path, "max_input_tokens"), 8191, 1),
            "dimensions": dimensions,
            "max_retries": self.integer(sec, (*path, "max_retries"), 5, 0),
            "retry_initial_delay": self.number(sec, (*path, "retry_initial_delay"), 0.5,
                                               positive=True),
            "retry_max_delay": self.number(sec, (*path, "retry_max_delay"), 8.0, positive=True),
            "retry_budget_seconds": self.number(sec, (*path, "retry_budget_seconds"), 10.0),
            "breaker_failures": self.integer(sec, (*path, "breaker_failures"), 5, 1),
            "breaker_reset_seconds": self.number(sec, (*path, "breaker_reset_seconds"), 10.0,
                                                 positive=True)}
