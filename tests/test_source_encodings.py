"""Source databases in another encoding than UTF8: LATIN1, and SQL_ASCII holding UTF-8 text.

Regressions:

* With its search tables in the same LATIN1 database, the worker wrote their JSON
  (term counts, payload, attrs) as UTF-8 bytes into a connection that expected
  LATIN1, and the server stored mojibake: `tf ? 'café'` matched nothing, so no query
  with an accented word found anything lexically, and a filter on an accented attrs
  value matched nothing (psycopg reads JSON back as UTF-8, so the documents looked
  right). A title template with an em dash made `setup` die with a UnicodeEncodeError.
* In a SQL_ASCII database psycopg returned `bytes` for every text value: `run`
  refused every table as TEMPORARY (`relpersistence` read as b'p'), and the slot's
  lag could not be read.

Every connection now asks for UTF8 (the server converts LATIN1 values), and the
search tables refuse a database that is not UTF8, since titles, terms and JSON hold
any Unicode text; they go in a UTF8 database beside it (`[search] dsn`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cli_harness import WorkerProcess, cli, query, run_sql, shown, toml_string, write_config
from .conftest import _fresh_database

DDL = """
CREATE TABLE public.places (
    id int PRIMARY KEY, owner text NOT NULL, title text NOT NULL, body text NOT NULL,
    city varchar(40), code char(6), meta jsonb, tags text[], done boolean NOT NULL
);
INSERT INTO places VALUES
    (1, 'user-1', 'Café crème', 'Größe naïve à Orléans', 'Orléans', 'été',
     '{"ville": "Orléans", "note": "déjà"}', '{été,hiver}', true),
    (2, 'user-1', 'Señor Ñandú', 'un câble de 5 µm', 'Nîmes', 'ñ', '{"ville": "Nîmes"}',
     '{printemps}', false),
    (3, 'user-2', 'plain', 'ascii only', 'Paris', 'p', '{}', '{}', false);
"""
TOML = """
[tables."public.places"]
object_type = "place"
title = "{title}"
body = "{body} — {city}"
keywords = ["tags"]
partition = "{owner}"
attrs = ["done", "city"]
payload = ["meta", "code"]
"""


@pytest.fixture
def latin1_dsn(pg_server) -> Iterator[str]:
    with _fresh_database(pg_server, "LATIN1") as dsn:
        yield dsn


@pytest.fixture
def sql_ascii_dsn(pg_server) -> Iterator[str]:
    with _fresh_database(pg_server, "SQL_ASCII") as dsn:
        yield dsn


def docs(search: str) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in query(
        search, "SELECT object_id, title, body, keywords, attrs, payload FROM slipstream.docs "
                "WHERE NOT deleted")}


def matched(search: str, condition: str, *params: object) -> list[str]:
    """The keys the search database itself finds with `condition` (JSON read server-side)."""
    return sorted(r[0] for r in query(
        search, f"SELECT object_id FROM slipstream.docs WHERE {condition}", params))


def check_accents_read_server_side(search: str) -> None:
    assert matched(search, "tf ? %s", "café") == ["1"]
    assert matched(search, "tf ? %s", "μm") == ["2"]  # NFKC: LATIN1's micro sign is a Greek mu
    assert matched(search, "attrs ->> 'city' = %s", "Orléans") == ["1"]
    assert matched(search, "payload -> 'meta' ->> 'note' = %s", "déjà") == ["1"]
    assert matched(search, "keywords ? %s", "été") == ["1"]


def test_a_latin1_source_indexes_into_a_utf8_search_database(
        latin1_dsn: str, other_dsn: str, tmp_path: Path) -> None:
    source, search = latin1_dsn, other_dsn
    run_sql(source, DDL)
    config = write_config(tmp_path / "slipstream.toml", source, TOML,
                          extra=f"\n[search]\ndsn = {toml_string(search)}\n")
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    assert docs(search)["1"] == (
        "Café crème", "Größe naïve à Orléans — Orléans", ["été", "hiver"],
        {"done": True, "city": "Orléans"},
        {"meta": {"ville": "Orléans", "note": "déjà"}, "code": "été   "})
    assert docs(search)["2"][:2] == ("Señor Ñandú", "un câble de 5 µm — Nîmes")
    check_accents_read_server_side(search)

    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(source)
        run_sql(source, "INSERT INTO places VALUES (4, 'user-2', 'Crème brûlée', 'à la française', "
                        "'Dijon', 'd', '{\"goût\": \"sucré\"}', '{dessert}', true)",
                "UPDATE places SET title = 'Café noir' WHERE id = 1")
        worker.wait_caught_up(source)
    assert docs(search)["4"] == ("Crème brûlée", "à la française — Dijon", ["dessert"],
                                 {"done": True, "city": "Dijon"},
                                 {"meta": {"goût": "sucré"}, "code": "d     "})
    assert matched(search, "payload -> 'meta' ->> 'goût' = %s", "sucré") == ["4"]
    assert matched(search, "tf ? %s", "crème") == ["4"]  # row 1's title no longer has it
    assert query(search, "SELECT count(*) FROM slipstream.dead_letters") == [(0,)]

    found = cli("search", "crème", "--partition", "user-2", "--json", "--config", str(config),
                cwd=tmp_path)
    assert found.returncode == 0, shown(found)
    hits = json.loads(found.stdout)
    assert [(h["object_id"], h["match_type"]) for h in hits][:1] == [("4", "hybrid")], hits


def test_a_latin1_database_is_refused_for_the_search_tables(latin1_dsn: str, tmp_path: Path) -> None:
    source = latin1_dsn
    run_sql(source, DDL)
    config = write_config(tmp_path / "slipstream.toml", source, TOML)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode != 0, shown(setup)
    message = setup.stderr + setup.stdout
    assert "need a UTF8 database" in message and "is LATIN1" in message, shown(setup)
    assert "[search] dsn" in message and "Traceback" not in message, shown(setup)
    # Nothing made: no search schema, publication or slot.
    assert query(source, "SELECT count(*) FROM pg_namespace WHERE nspname = 'slipstream'") == [(0,)]
    assert query(source, "SELECT count(*) FROM pg_publication") == [(0,)]
    assert query(source, "SELECT count(*) FROM pg_replication_slots "
                         "WHERE database = current_database()") == [(0,)]


def test_a_sql_ascii_source_holding_utf8_text_is_indexed(
        sql_ascii_dsn: str, other_dsn: str, tmp_path: Path) -> None:
    source, search = sql_ascii_dsn, other_dsn
    app = source + " client_encoding=UTF8"  # the application writes UTF-8; the config is as is
    run_sql(app, DDL)
    config = write_config(tmp_path / "slipstream.toml", source, TOML,
                          extra=f"\n[search]\ndsn = {toml_string(search)}\n")
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(app)
        run_sql(app, "INSERT INTO places VALUES (4, 'user-2', 'Crème brûlée', 'à la française', "
                     "'Dijon', 'd', '{\"goût\": \"sucré\"}', '{dessert}', true)")
        worker.wait_caught_up(app)
        assert not [e for e in worker.events() if e.get("level") in ("warning", "error")]
    check_accents_read_server_side(search)
    assert docs(search)["4"][:2] == ("Crème brûlée", "à la française — Dijon")
    status = cli("status", "--config", str(config), "--json", cwd=tmp_path)
    assert status.returncode == 0, shown(status)
    report = json.loads(status.stdout)
    assert report["counts"] == [{"object_type": "place", "live": 4, "tombstones": 0}], report


LATIN1_BYTES = "convert_from('\\x436166e920636f6e6e75'::bytea, 'SQL_ASCII')"  # 'Café connu' in LATIN1


def test_a_sql_ascii_value_that_is_not_utf8_is_its_rows_dead_letter(
        sql_ascii_dsn: str, other_dsn: str, tmp_path: Path) -> None:
    """Regression: a SQL_ASCII database stores any bytes, and one value that was not UTF-8
    (a LATIN1 'é' written by an older client) failed the whole initial copy (`invalid byte
    sequence for encoding "UTF8": 0xe9`) or, streamed, stopped the stream for good: the
    server failed the stream at that change on every reconnect, so nothing after it was
    ever indexed. Such a value is now its row's dead letter, copied or streamed."""
    source, search = sql_ascii_dsn, other_dsn
    app = source + " client_encoding=UTF8"
    run_sql(app, DDL, f"INSERT INTO places VALUES (5, 'user-1', {LATIN1_BYTES}, 'copied', "
                      "'Lyon', 'l', '{}', '{}', false)")
    config = write_config(tmp_path / "slipstream.toml", source, TOML,
                          extra=f"\n[search]\ndsn = {toml_string(search)}\n")
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 1, shown(setup)  # the copy finished; a row is a dead letter
    assert "1 rows of public.places went to dead letters" in setup.stderr, shown(setup)
    assert "bytes are not UTF-8" in setup.stderr, shown(setup)
    assert sorted(docs(search)) == ["1", "2", "3"]
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(app)
        run_sql(app, f"INSERT INTO places VALUES (6, 'user-1', 'streamed', {LATIN1_BYTES}, "
                     "'Lyon', 'l', '{}', '{}', false)",
                "INSERT INTO places VALUES (7, 'user-1', 'after it', 'still indexed', 'Lyon', 'l', "
                "'{}', '{}', false)")
        worker.wait_caught_up(app)
        assert not [e for e in worker.events() if e.get("event") == "reconnecting"]
    assert sorted(docs(search)) == ["1", "2", "3", "7"]
    letters = query(search, "SELECT row_key, op, row_values ->> 'title', row_values ->> 'body', "
                            "error FROM slipstream.dead_letters ORDER BY id")
    assert [letter[:4] for letter in letters] == [
        ('["5"]', "snapshot", "Caf\\xe9 connu", "copied"),
        ('["6"]', "insert", "streamed", "Caf\\xe9 connu")], letters
    assert all("not UTF-8" in letter[4] and "SQL_ASCII" in letter[4] for letter in letters), letters

    # The fix the README gives: rewrite the LATIN1 bytes as UTF-8, then retry the letters.
    recode = "convert_from(convert(convert_to({0}, 'SQL_ASCII'), 'LATIN1', 'UTF8'), 'SQL_ASCII')"
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(app)
        run_sql(app, f"UPDATE places SET title = {recode.format('title')} WHERE id = 5",
                f"UPDATE places SET body = {recode.format('body')} WHERE id = 6")
        worker.wait_caught_up(app)
    retry = cli("deadletter", "retry", "--config", str(config), cwd=tmp_path)
    assert retry.returncode == 0, shown(retry)
    assert docs(search)["5"][:2] == ("Café connu", "copied — Lyon")
    assert docs(search)["6"][:2] == ("streamed", "Café connu — Lyon")
    assert query(search, "SELECT count(*) FROM slipstream.dead_letters WHERE resolved_at IS NULL") == [(0,)]
