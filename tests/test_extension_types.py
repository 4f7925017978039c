"""Columns of contrib extensions and rarer built-in types, as app tables have them.

`citext` keys (e-mail addresses), `hstore`, `ltree`, multiranges, bit strings, `timetz`,
`tsvector`/`tsquery`, composite types, `name`, `"char"`, `oid`, numeric NaN and an
infinite `updated_at`: a row copied at setup and the same row streamed afterwards give
the same document, nothing becomes a dead letter, and an update or delete that names a
`citext` key in another case reaches the document of the row it matched.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from .cli_harness import WorkerProcess, cli, query, run_sql, shown, write_config
from .test_type_fidelity import open_dead_letters

DDL = """
CREATE EXTENSION IF NOT EXISTS citext;
CREATE EXTENSION IF NOT EXISTS hstore;
CREATE EXTENSION IF NOT EXISTS ltree;
CREATE TYPE addr AS (street text, zip int);
CREATE TABLE public.members (
    email citext PRIMARY KEY, owner text NOT NULL, nick citext, nicks citext[], h hstore,
    path ltree, vb varbit, b4 bit(4), tt timetz, mr int4multirange, tv tsvector, tq tsquery,
    n numeric, upd timestamptz, ad addr, nm name, ch "char", o oid, js jsonb
);
"""
COLUMNS = "email, owner, nick, nicks, h, path, vb, b4, tt, mr, tv, tq, n, upd, ad, nm, ch, o, js"
VALUES = """%s, 'team-1', 'MiXeD Case', ARRAY['Ab', 'cD']::citext[], 'a=>1, "b c"=>NULL',
    'top.science.astro', B'10101', B'1010', '10:11:12+05:30', '{[1,3),[5,7)}', 'fat cats ate',
    'fat & rat', 'NaN', 'infinity', ROW('Main St', 12345), 'somename', 'x', 42,
    '{"k": [1, "two"]}'"""
TOML = """
[tables."public.members"]
object_type = "member"
title = "{nick} {path}"
body = "{h} {vb} {b4} {tt} {mr} {tv} {tq} {n} {ad} {nm} {ch} {o} {nicks}"
partition = "{owner}"
updated_at = "upd"
attrs = ["nick"]
payload = ["email", "nicks", "h", "path", "vb", "b4", "tt", "mr", "tv", "tq", "n", "ad", "nm", "ch", "o", "js"]
"""


def insert(dsn: str, email: str) -> None:
    with_params = f"INSERT INTO public.members ({COLUMNS}) VALUES ({VALUES})"
    run_sql(dsn, with_params.replace("%s", "'" + email.replace("'", "''") + "'", 1))


def docs(dsn: str) -> dict[str, tuple]:
    rows = query(dsn, "SELECT object_id, deleted, title, body, payload - 'email', attrs, source_updated_at "
                      "FROM slipstream.docs WHERE object_type = 'member'")
    return {r[0]: tuple(json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for v in r[1:])
            for r in rows}


def test_extension_and_rare_types_read_the_same_copied_and_streamed(pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    have = {r[0] for r in query(dsn, "SELECT name FROM pg_available_extensions")}
    if not {"citext", "hstore", "ltree"} <= have:
        pytest.skip("this server has no contrib extensions (citext, hstore, ltree)")
    run_sql(dsn, DDL)
    insert(dsn, "Ann@Example.org")  # present before setup: the initial copy reads it
    config = write_config(tmp_path / "slipstream.toml", dsn, TOML)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    assert open_dead_letters(dsn) == []

    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        insert(dsn, "Bob@Example.org")  # the same values, through the stream
        worker.wait_caught_up(dsn)
        both = docs(dsn)
        assert set(both) == {"Ann@Example.org", "Bob@Example.org"}, both
        assert both["Ann@Example.org"] == both["Bob@Example.org"]

        deleted, title, body, payload, attrs, updated = both["Ann@Example.org"]
        assert not deleted and title == "MiXeD Case top.science.astro"
        assert "10101 1010 10:11:12+05:30 {[1,3),[5,7)}" in body and "NaN" in body
        assert updated == datetime.max.replace(tzinfo=UTC)  # 'infinity': the latest time there is
        payload = json.loads(payload)
        assert payload["h"] == '"a"=>"1", "b c"=>NULL' and payload["path"] == "top.science.astro"
        assert payload["nicks"] == ["Ab", "cD"] and payload["ad"] == '("Main St",12345)'
        assert payload["n"] is None  # JSON has no NaN
        assert (payload["o"], payload["ch"], payload["js"]) == (42, "x", {"k": [1, "two"]})
        assert json.loads(attrs) == {"nick": "MiXeD Case"}

        # citext compares without case: the statements name the keys in another case.
        run_sql(dsn, "UPDATE public.members SET nick = 'renamed' WHERE email = 'ann@EXAMPLE.ORG'")
        run_sql(dsn, "DELETE FROM public.members WHERE email = 'BOB@example.org'")
        worker.wait_caught_up(dsn)
    after = docs(dsn)
    assert set(after) == {"Ann@Example.org", "Bob@Example.org"}, after
    assert after["Ann@Example.org"][1] == "renamed top.science.astro"
    assert after["Bob@Example.org"][0] is True  # a tombstone, under the key it was indexed by
    assert open_dead_letters(dsn) == []
