"""A publication made by hand that would hide changes is refused before anything is made.

Regression: `setup` used an existing publication as it found it. One created with
`publish = 'insert, update'` made every delete pass unseen (the documents of deleted
rows stayed searchable); one with a column list or a row filter (PostgreSQL 15+) let
the copy index rows and columns the stream never updates.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .cli_harness import WorkerProcess, cli, live_docs, query, run_sql, shown, slot_row, write_config

TABLE = """
[tables."public.notes"]
object_type = "note"
title = "{title}"
partition = "{owner}"
"""


@pytest.mark.parametrize(("publication", "message"), [
    ("CREATE PUBLICATION slipstream FOR TABLE notes WITH (publish = 'insert, update')",
     "publication 'slipstream' does not publish delete, truncate, so the index would miss them; "
     "run ALTER PUBLICATION slipstream SET (publish = 'insert, update, delete, truncate')"),
    ("CREATE PUBLICATION slipstream FOR ALL TABLES WITH (publish = 'insert, update, delete')",
     "does not publish truncate"),
    ("CREATE PUBLICATION slipstream FOR TABLE notes (id, owner)",
     "publication 'slipstream' publishes only some of its columns (a column list) of public.notes"),
    ("CREATE PUBLICATION slipstream FOR TABLE notes WHERE (owner <> 'hidden')",
     "publishes only some of its rows (a WHERE clause) of public.notes"),
])
def test_a_publication_that_hides_changes_is_refused(pg_dsn: str, tmp_path: Path, publication: str,
                                                      message: str) -> None:
    dsn = pg_dsn
    if "(id" in publication or "WHERE" in publication:
        if int(query(dsn, "SHOW server_version_num")[0][0]) < 150000:
            pytest.skip("column lists and row filters came in PostgreSQL 15")
    run_sql(dsn, "CREATE TABLE notes (id int PRIMARY KEY, owner text, title text)",
            "INSERT INTO notes VALUES (1, 'u1', 'one')", publication)
    config = write_config(tmp_path / "slipstream.toml", dsn, TABLE)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 2, shown(setup)
    assert message in setup.stderr, shown(setup)
    assert slot_row(dsn) is None  # nothing made
    assert query(dsn, "SELECT pubviaroot, pubdelete FROM pg_publication")[0][0] is False


def test_a_complete_publication_made_by_hand_is_used(pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    run_sql(dsn, "CREATE TABLE notes (id int PRIMARY KEY, owner text, title text)",
            "INSERT INTO notes VALUES (1, 'u1', 'one'), (2, 'u1', 'two')",
            "CREATE PUBLICATION slipstream FOR TABLE notes")
    config = write_config(tmp_path / "slipstream.toml", dsn, TABLE)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0 and "publication: present" in setup.stdout, shown(setup)
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "DELETE FROM notes WHERE id = 1")
        worker.wait_caught_up(dsn)
    assert set(live_docs(dsn, "note")) == {"2"}
