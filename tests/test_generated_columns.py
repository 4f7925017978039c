"""Generated columns: a copied row and a streamed row carry the same columns.

Regression: the initial copy read every column, generated ones included, while
pgoutput sends no generated column unless the publication asks for STORED ones
(PostgreSQL 18) and never a VIRTUAL one. A template naming a generated column worked
for the copied rows and dead-lettered every streamed change (`the row has no column
'full_name'`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .cli_harness import WorkerProcess, cli, query, run_sql, shown, write_config

DDL = """
CREATE SCHEMA app;
CREATE TABLE app."Notes" (
    id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    first text NOT NULL, last text NOT NULL, "Body Text" text, owner text NOT NULL, done boolean,
    full_name text GENERATED ALWAYS AS (first || ' ' || last) STORED,
    shout text GENERATED ALWAYS AS (upper(first)) {kind}
);
INSERT INTO app."Notes" (first, last, "Body Text", owner, done)
    VALUES ('ada', 'lovelace', 'analytical engines', 'user-1', true),
           ('grace', 'hopper', 'compilers', 'user-2', true);
"""
TOML = """
[tables."app.Notes"]
object_type = "note"
title = "{full_name}"
body = "{Body Text}"
partition = "{owner}"
attrs = ["done"]
payload = ["full_name", "first"]
"""
INSERT = """INSERT INTO app."Notes" (first, last, "Body Text", owner, done)
    VALUES ('alan', 'turing', 'computing machinery', 'user-1', false)"""


def server_version(dsn: str) -> int:
    return int(query(dsn, "SHOW server_version_num")[0][0])


def documents(dsn: str) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in query(
        dsn, "SELECT object_id, title, body, payload FROM slipstream.docs WHERE NOT deleted")}


def stored_columns(dsn: str) -> dict[str, list[str]]:
    """The columns the worker holds of each source row (what its mapper was given)."""
    return {k: sorted(v) for k, v in query(
        dsn, "SELECT row_key, row_values FROM slipstream.source_rows WHERE NOT deleted")}


def run_the_stream(dsn: str, config: Path, cwd: Path) -> None:
    with WorkerProcess(config, cwd=cwd) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, INSERT, """UPDATE app."Notes" SET last = 'byron' WHERE first = 'ada'""")
        worker.wait_caught_up(dsn)


def check_documents(dsn: str) -> None:
    assert query(dsn, "SELECT error FROM slipstream.dead_letters") == []
    assert documents(dsn) == {
        "1": ("ada byron", "analytical engines", {"full_name": "ada byron", "first": "ada"}),
        "2": ("grace hopper", "compilers", {"full_name": "grace hopper", "first": "grace"}),
        "3": ("alan turing", "computing machinery", {"full_name": "alan turing", "first": "alan"}),
    }
    # Row 2 was only copied, row 3 only streamed, row 1 both: the same columns, the STORED
    # generated one included, the VIRTUAL one in none.
    columns = stored_columns(dsn)
    assert columns['["1"]'] == columns['["2"]'] == columns['["3"]'] == sorted(
        ["id", "first", "last", "Body Text", "owner", "done", "full_name"])


def test_a_stored_generated_column_is_copied_and_streamed_alike(pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    if server_version(dsn) < 180000:
        pytest.skip("PostgreSQL publishes generated columns from version 18")
    run_sql(dsn, DDL.format(kind="VIRTUAL"))
    config = write_config(tmp_path / "slipstream.toml", dsn, TOML)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    assert query(dsn, "SELECT pubgencols::text FROM pg_publication WHERE pubname = 'slipstream'") == [("s",)]
    run_the_stream(dsn, config, tmp_path)
    check_documents(dsn)


def test_an_existing_publication_is_switched_to_publish_stored_generated_columns(
        pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    if server_version(dsn) < 180000:
        pytest.skip("PostgreSQL publishes generated columns from version 18")
    run_sql(dsn, DDL.format(kind="VIRTUAL"), 'CREATE PUBLICATION slipstream FOR TABLE app."Notes"')
    config = write_config(tmp_path / "slipstream.toml", dsn, TOML)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    assert "set to publish stored generated columns" in setup.stdout, shown(setup)
    run_the_stream(dsn, config, tmp_path)
    check_documents(dsn)


def test_a_template_naming_an_unpublished_generated_column_is_refused(pg_dsn: str, tmp_path: Path) -> None:
    """Before anything is made: it could be copied but never streamed."""
    dsn = pg_dsn
    modern = server_version(dsn) >= 180000
    run_sql(dsn, DDL.format(kind="VIRTUAL" if modern else "STORED"))
    config = write_config(tmp_path / "slipstream.toml", dsn, TOML.replace('"first"]', '"shout"]'))
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 2, shown(setup)
    assert ("""tables."app.Notes".payload: column 'shout' of app.Notes is a generated column, """
            "which logical replication does not carry") in setup.stderr, shown(setup)
    assert query(dsn, "SELECT count(*) FROM pg_publication") == [(0,)]
    assert query(dsn, "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()") == [(0,)]
