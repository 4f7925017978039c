"""The worker's TOML configuration: the sample loads, every mistake names its key path, secrets stay out of logs."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict
from slipstream.index.pg_connect import pinned_conninfo
from slipstream.index.errors import ConfigurationError
from slipstream.worker.config import (
    ConfigError,
    WorkerConfig,
    key_path,
    load_config,
    parse_config,
    redact_dsn,
)

SAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "slipstream.example.toml"
NOTES = 'tables."public.notes"'

BASE: dict[str, Any] = {
    "source": {"dsn": "postgresql://app@localhost/app"},
    "spaces": {"local": 8},
    "embedders": {"local": {"kind": "hashing"}},
    "tables": {"public.notes": {"title": "{title}", "body": "{body}", "spaces": ["local"]}},
}


def config_with(**changes: Any) -> dict[str, Any]:
    """BASE with changes given as dotted paths ('tables.public.notes' is not split: use '/')."""
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("/")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return data


_DELETE = object()


def error_for(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="test.toml")
    return info.value


# -- what loads ------------------------------------------------------------------------------

def test_sample_config_loads() -> None:
    cfg = load_config(SAMPLE)
    assert cfg.source.dsn_env == "APP_DATABASE_URL" and cfg.source.slot == "slipstream"
    assert dict(cfg.spaces) == {"local": 384, "server": 1536}
    assert cfg.embedders["server"].kind == "http" and cfg.embedders["local"].dim == 384
    notes = cfg.tables["public.notes"]
    assert notes.object_type == "note" and notes.title.columns == ("title",)
    assert notes.partition.columns == ("owner_id",)
    assert notes.chunks is not None and (notes.chunks.size, notes.chunks.overlap) == (2000, 200)
    assert notes.max_body_chars == 200000
    assert notes.filter is not None and notes.filter.one_of["status"] == ("published", "archived")
    assert cfg.tables["public.order_lines"].id_columns == ("order_id", "line_no")
    json.dumps(cfg.safe_dict())


def test_minimal_config_gets_documented_defaults() -> None:
    cfg = parse_config({"source": {"dsn_env": "APP_DATABASE_URL"},
                        "tables": {"public.notes": {}}})
    assert (cfg.source.slot, cfg.source.publication) == ("slipstream", "slipstream")
    assert (cfg.search.schema, cfg.search.exact_limit, cfg.search.dsn) == ("slipstream", 20000, None)
    w = cfg.worker
    assert (w.batch_max_changes, w.batch_max_bytes, w.batch_max_seconds) == (2000, 8388608, 0.25)
    assert (w.status_interval_seconds, w.heartbeat_seconds, w.http_port) == (10.0, 0.0, 9187)
    assert (w.mapper_modules, w.snapshot_chunk_rows) == ((), 5000)
    notes = cfg.tables["public.notes"]
    assert notes.object_type == "notes"  # the table name
    assert notes.id_columns == () and notes.spaces is None and notes.node_kind == "leaf"
    assert notes.partition.source == "default" and notes.filter is None and notes.chunks is None
    assert notes.max_body_chars is None  # the whole body


def test_config_is_frozen() -> None:
    cfg = parse_config(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.source.slot = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.tables["public.other"] = cfg.tables["public.notes"]  # type: ignore[index]


def test_python_route_table() -> None:
    cfg = parse_config(config_with(**{"tables/public.notes": {"python": "myapp.mappers:notes"}}))
    assert cfg.tables["public.notes"].python == "myapp.mappers:notes"


def test_key_path_quotes_keys_that_are_not_bare() -> None:
    assert key_path("tables", "public.notes", "filter", "status") == 'tables."public.notes".filter.status'
    assert key_path("worker", "mapper_modules", 0) == "worker.mapper_modules[0]"


# -- what is refused, and where ----------------------------------------------------------------

ERROR_CASES = [
    # (changes to BASE, key path named, words the message must contain)
    ({"tabels": {}}, "tabels", "did you mean 'tables'"),
    ({"tables/public.notes/titel": "{title}"}, f"{NOTES}.titel", "did you mean 'title'"),
    ({"worker/batch_max_change": 5}, "worker.batch_max_change", "did you mean 'batch_max_changes'"),
    ({"source/slott": "x"}, "source.slott", "did you mean 'slot'"),
    ({"worker/batch_max_changes": "2000"}, "worker.batch_max_changes", "must be an integer"),
    ({"worker/http_port": True}, "worker.http_port", "must be an integer"),
    ({"worker/snapshot_chunk_rows": 10.0}, "worker.snapshot_chunk_rows", "must be an integer"),
    ({"worker/batch_max_changes": -1}, "worker.batch_max_changes", "≥ 1"),
    ({"worker/heartbeat_seconds": -5}, "worker.heartbeat_seconds", "≥ 0"),
    ({"worker/batch_max_seconds": 0}, "worker.batch_max_seconds", "> 0"),
    ({"worker/status_interval_seconds": float("nan")}, "worker.status_interval_seconds", "> 0"),
    ({"worker/http_port": 70000}, "worker.http_port", "≤ 65535"),
    ({"worker/mapper_modules": "myapp.mappers"}, "worker.mapper_modules", "must be an array"),
    ({"worker/mapper_modules": ["myapp/mappers"]}, "worker.mapper_modules[0]", "dotted import path"),
    ({"source/slot": "Slip-Stream"}, "source.slot", "lower-case letters"),
    ({"source/publication": "1pub"}, "source.publication", "not a plain identifier"),
    ({"search/schema": "my schema"}, "search.schema", "not a plain identifier"),
    ({"search/exact_limit": 0}, "search.exact_limit", "≥ 1"),
    ({"source/dsn": _DELETE}, "source.dsn", "dsn_env"),
    ({"source/dsn_env": "APP_DATABASE_URL"}, "source.dsn", "both set"),
    ({"source/dsn": "mysql://app@localhost/app"}, "source.dsn", "not a Postgres DSN"),
    ({"source/dsn": ""}, "source.dsn", "empty"),
    ({"source/dsn": "host=db password=s3cret sslmode"}, "source.dsn", "not a valid libpq connection"),
    ({"source/dsn": _DELETE, "source/dsn_env": "APP-URL"}, "source.dsn_env", "environment variable"),
    ({"search/dsn": "postgresql://x@h/db", "search/dsn_env": "SEARCH_URL"}, "search.dsn", "both set"),
    ({"source": _DELETE}, "source", "add [source]"),
    ({"spaces": 3}, "spaces", "must be a table"),
    ({"spaces/bad-name": 8, "embedders/bad-name": {"kind": "hashing"}}, 'spaces.bad-name',
     "not an embedding space name"),
    ({"spaces/local": 0}, "spaces.local", "≥ 1"),
    ({"spaces/server": 16}, "spaces.server", "add [embedders.server]"),
    ({"embedders/lcoal": {"kind": "hashing"}}, "embedders.lcoal", "did you mean 'local'"),
    ({"embedders/local/kind": "hashnig"}, "embedders.local.kind", "did you mean 'hashing'"),
    ({"embedders/local/url": "http://x"}, "embedders.local.url", 'only applies to kind = "http"'),
    ({"embedders/local": {"kind": "http", "url": "https://api.example/v1"}}, "embedders.local.model",
     "missing"),
    ({"embedders/local": {"kind": "http", "url": "ftp://x", "model": "m"}}, "embedders.local.url",
     "not an http(s) URL"),
    ({"embedders/local": {"kind": "http", "url": "https://x/v1", "model": "m", "api_key": "k",
                          "api_key_env": "KEY"}}, "embedders.local.api_key", "both set"),
    ({"embedders/local": {"kind": "http", "url": "https://x/v1", "model": "m", "batch_size": 0}},
     "embedders.local.batch_size", "≥ 1"),
    ({"tables/public.notes/spaces": ["lokal"]}, f"{NOTES}.spaces[0]", "did you mean 'local'"),
    ({"tables/public.notes/title": "{title.upper}"}, f"{NOTES}.title", "attribute or index access"),
    ({"tables/public.notes/title": "{tags[0]}"}, f"{NOTES}.title", "attribute or index access"),
    ({"tables/public.notes/body": "{body!r}"}, f"{NOTES}.body", "conversion or format spec"),
    ({"tables/public.notes/body": "{created_at:%Y}"}, f"{NOTES}.body", "conversion or format spec"),
    ({"tables/public.notes/partition": "{}"}, f"{NOTES}.partition", "positional"),
    ({"tables/public.notes/partition": "{0}"}, f"{NOTES}.partition", "positional"),
    ({"tables/public.notes/title": "{ title }"}, f"{NOTES}.title", "write {title}"),
    ({"tables/public.notes/title": "{title"}, f"{NOTES}.title", "literal braces"),
    ({"tables/public.notes/title": 5}, f"{NOTES}.title", "must be a template string"),
    ({"tables/public.notes/keywords": "tags"}, f"{NOTES}.keywords", "must be an array"),
    ({"tables/public.notes/keywords": ["tags", "tags"]}, f"{NOTES}.keywords[1]", "listed twice"),
    ({"tables/public.notes/id_columns": ["id", 3]}, f"{NOTES}.id_columns[1]", "non-empty string"),
    ({"tables/public.notes/attrs": ["Status Code"]}, f"{NOTES}.attrs[0]", "attrs key"),
    ({"tables/public.notes/node_kind": "leaves"}, f"{NOTES}.node_kind", "did you mean 'leaf'"),
    ({"tables/public.notes/chunks": {"size": 100, "overlap": 100}}, f"{NOTES}.chunks.overlap",
     "smaller than size"),
    ({"tables/public.notes/chunks": {"size": 0}}, f"{NOTES}.chunks.size", "≥ 1"),
    ({"tables/public.notes/chunks": {"size": 100, "overlap": -1}}, f"{NOTES}.chunks.overlap", "≥ 0"),
    ({"tables/public.notes/chunks": {"sise": 100}}, f"{NOTES}.chunks.sise", "did you mean 'size'"),
    ({"tables/public.notes/max_body_chars": 0}, f"{NOTES}.max_body_chars", "≥ 1"),
    ({"tables/public.notes/max_body_chars": "100k"}, f"{NOTES}.max_body_chars", "integer"),
    ({"tables/public.notes/chunks": {"size": 100}, "tables/public.notes/payload": ["parent_id"]},
     f"{NOTES}.payload[0]", "chunk nodes set"),
    ({"tables/public.notes/filter": {"status": []}}, f"{NOTES}.filter.status", "no row could pass"),
    ({"tables/public.notes/filter": {"status": [["a"]]}}, f"{NOTES}.filter.status[0]",
     "must be a string, number"),
    ({"tables/public.notes/filter": {"not_null": "owner_id"}}, f"{NOTES}.filter.not_null",
     "must be an array"),
    ({"tables/public.notes/python": "myapp.mappers.notes"}, f"{NOTES}.python",
     '"package.module:function"'),
    ({"tables/public.notes/python": "myapp.mappers:notes"}, f"{NOTES}.title",
     "mapped by that function alone"),
    ({"tables/notes": {"title": "{title}"}}, "tables.notes", '[tables."public.notes"]'),
    ({"tables/public": {"notes": {"title": "{title}"}}}, "tables.public", '[tables."public.notes"]'),
    ({"tables/public.my-notes": {}}, 'tables."public.my-notes"', "not a plain Postgres name"),
    ({"tables/public.drafts": {"object_type": "notes"}}, 'tables."public.drafts".object_type',
     "give each table its own object_type"),
]


@pytest.mark.parametrize(("changes", "path", "words"), ERROR_CASES,
                         ids=[f"{i}-{c[1]}" for i, c in enumerate(ERROR_CASES)])
def test_bad_configuration_names_key_path_and_fix(changes: dict[str, Any], path: str,
                                                  words: str) -> None:
    exc = error_for(config_with(**changes))
    assert isinstance(exc, ConfigurationError)
    assert exc.path == path, str(exc)
    assert str(exc).startswith(f"test.toml: {path}: "), str(exc)
    assert words in str(exc), str(exc)


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text('[source]\ndsn = "unterminated\n')
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML: .*line 2"):
        load_config(broken)
    typo = tmp_path / "typo.toml"
    typo.write_text('[source]\ndsn = "postgresql://a@b/c"\n[tables."public.notes"]\nbdoy = "{body}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(typo)
    assert info.value.path == f"{NOTES}.bdoy" and "did you mean 'body'" in str(info.value)
    assert str(info.value).startswith(str(typo))


def test_check_columns_names_the_key_and_suggests_a_column() -> None:
    cfg = parse_config(config_with(**{"tables/public.notes/filter": {"status": ["a"]}}))
    notes = cfg.tables["public.notes"]
    notes.check_columns({"id", "title", "body", "status"})
    with pytest.raises(ConfigError) as info:
        notes.check_columns({"id", "titel", "body", "status"})
    assert info.value.path == f"{NOTES}.title" and "did you mean 'titel'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        notes.check_columns({"id", "title", "body"})
    assert info.value.path == f"{NOTES}.filter.status"


# -- secrets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("dsn", "shown"), [
    ("postgresql://app:s3cret@db:5432/app", "postgresql://app:***@db:5432/app"),
    ("postgres://app:p%40ss/word@db/app?sslmode=require", "postgres://app:***@db/app?sslmode=require"),
    ("postgresql://app@db/app?password=s3cret&sslmode=require",
     "postgresql://app@db/app?password=***&sslmode=require"),
    ("postgresql://app:s3cret@h1:5432,h2:5432/app?sslpassword=k3y",
     "postgresql://app:***@h1:5432,h2:5432/app?sslpassword=***"),
    ("host=db user=app password=s3cret dbname=app", "host=db user=app password=*** dbname=app"),
    ("host=db password = 's3 cr\\'et' dbname=app", "host=db password = *** dbname=app"),
    ("postgresql://app@db/app", "postgresql://app@db/app"),
])
def test_redact_dsn(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


def test_redacted_twin_hides_every_secret() -> None:
    data = config_with(**{
        "source/dsn": "postgresql://app:s3cret-src@db/app",
        "search/dsn": "host=search password=s3cret-search dbname=s",
        "embedders/local": {"kind": "http", "url": "https://bot:s3cret-url@api.example/v1",
                            "model": "m", "api_key": "s3cret-key"},
    })
    cfg = parse_config(data)
    safe = cfg.redacted()
    assert isinstance(safe, WorkerConfig)
    assert safe.source.dsn == "postgresql://app:***@db/app"
    assert safe.embedders["local"].api_key == "***"
    assert safe.tables == cfg.tables and safe.worker == cfg.worker  # nothing else changes
    for text in (repr(cfg), str(cfg), repr(safe), json.dumps(cfg.safe_dict()), repr(cfg.source),
                 repr(cfg.embedders["local"])):
        assert "s3cret" not in text, text
    assert cfg.source.dsn == "postgresql://app:s3cret-src@db/app"  # the real one is still there
    assert cfg.embedders["local"].resolve_api_key() == "s3cret-key"


def test_secrets_from_the_environment_are_read_only_when_asked() -> None:
    cfg = parse_config(config_with(**{
        "source/dsn": _DELETE, "source/dsn_env": "APP_URL",
        "embedders/local": {"kind": "http", "url": "https://x/v1", "model": "m",
                            "api_key_env": "EMBED_KEY"},
    }))
    env = {"APP_URL": "postgresql://a:pw@h/db", "EMBED_KEY": "k"}
    assert cfg.source.resolve_dsn(env) == env["APP_URL"]
    # The search side defaults to the source, with the session settings it pins (ISO dates).
    search = conninfo_to_dict(cfg.search.resolve_dsn(cfg.source, env))
    assert search["options"] == ("-c DateStyle=ISO -c IntervalStyle=postgres -c statement_timeout=0 "
                                 "-c lock_timeout=0 -c idle_in_transaction_session_timeout=0")
    assert conninfo_to_dict(pinned_conninfo(env["APP_URL"])) | {"options": search["options"]} == search
    assert cfg.embedders["local"].resolve_api_key(env) == "k"
    with pytest.raises(ConfigError) as info:
        cfg.source.resolve_dsn({})
    assert info.value.path == "source.dsn_env" and "APP_URL is not set" in str(info.value)
    with pytest.raises(ConfigError) as info:
        cfg.embedders["local"].resolve_api_key({})
    assert info.value.path == "embedders.local.api_key_env"
    with pytest.raises(ConfigError) as info:  # a DSN from the environment is checked as a literal one
        cfg.source.resolve_dsn({"APP_URL": "host=db password=s3cret sslmode"})
    assert info.value.path == "source.dsn_env" and "not a valid libpq connection" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_the_snapshot_cache_size_is_read_and_checked() -> None:
    assert parse_config(BASE).sync.snapshot_cache_mb == 1024
    assert load_config(SAMPLE).sync.snapshot_cache_mb == 1024
    assert parse_config(config_with(**{"sync/snapshot_cache_mb": 0})).sync.snapshot_cache_mb == 0
    err = error_for(config_with(**{"sync/snapshot_cache_mb": -1}))
    assert "sync.snapshot_cache_mb" in str(err) and "≥ 0" in str(err)


def test_the_token_leeway_is_read_and_checked() -> None:
    assert parse_config(BASE).sync.token_leeway_seconds == 60
    assert parse_config(config_with(**{"sync/token_leeway_seconds": 0})).sync.token_leeway_seconds == 0
    err = error_for(config_with(**{"sync/token_leeway_seconds": 7200}))
    assert "sync.token_leeway_seconds" in str(err) and "≤ 3600" in str(err)


def test_the_sync_metrics_port_is_read_and_checked() -> None:
    assert parse_config(BASE).sync.metrics_port == 9188
    assert parse_config(config_with(**{"sync/metrics_port": 0})).sync.metrics_port == 0
    err = error_for(config_with(**{"sync/metrics_port": 70000}))
    assert "sync.metrics_port" in str(err) and "65535" in str(err)
