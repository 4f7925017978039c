"""A row has at most one open dead letter, and a later change that applies settles it.

Regression: every failing change of a row added a letter of its own (a row without an
owner, edited ten times, was ten open letters), and a letter stayed open after the row
was fixed at the source or deleted, until `deadletter retry` was run by hand: `status`,
the setup's exit code and any alert on open letters went on reporting rows that were
fine. A change that applies (or deletes the row, or truncates its table) now settles
the row's letters, in the same transaction; one that fails again replaces them.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cli_harness import WorkerProcess, cli, query, run_sql, shown, write_config

TOML = """
[tables."public.notes"]
object_type = "note"
title = "{title}"
partition = "user-{owner}"
"""


def open_letters(dsn: str) -> list[tuple[str, str, str]]:
    return query(dsn, "SELECT row_key, op, row_values ->> 'title' FROM slipstream.dead_letters "
                      "WHERE resolved_at IS NULL ORDER BY row_key")


def live(dsn: str) -> list[str]:
    return [r[0] for r in query(dsn, "SELECT object_id FROM slipstream.docs WHERE NOT deleted "
                                     "ORDER BY object_id")]


def test_one_open_letter_per_row_settled_by_the_change_that_fixes_it(pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    run_sql(dsn, "CREATE TABLE notes (id int PRIMARY KEY, owner text, title text NOT NULL)",
            "INSERT INTO notes VALUES (1, NULL, 'no owner yet'), (2, 'a', 'fine')")
    config = write_config(tmp_path / "slipstream.toml", dsn, TOML)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 1 and "1 rows of public.notes went to dead letters" in setup.stderr, \
        shown(setup)
    assert open_letters(dsn) == [('["1"]', "snapshot", "no owner yet")]

    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        # Failing again: still one letter for the row, the last one.
        run_sql(dsn, "UPDATE notes SET title = 'edit 1' WHERE id = 1",
                "UPDATE notes SET title = 'edit 2' WHERE id = 1")
        worker.wait_caught_up(dsn)
        assert open_letters(dsn) == [('["1"]', "update", "edit 2")]
        # Fixed at the source: the change that applies settles it.
        run_sql(dsn, "UPDATE notes SET owner = 'a' WHERE id = 1")
        worker.wait_caught_up(dsn)
        assert open_letters(dsn) == [] and live(dsn) == ["1", "2"]

        # Deleted: nothing left to retry.
        run_sql(dsn, "INSERT INTO notes VALUES (3, NULL, 'doomed')")
        worker.wait_caught_up(dsn)
        assert open_letters(dsn) == [('["3"]', "insert", "doomed")]
        run_sql(dsn, "DELETE FROM notes WHERE id = 3")
        worker.wait_caught_up(dsn)
        assert open_letters(dsn) == []

        # Within one transaction, the row's last change decides.
        run_sql(dsn, "BEGIN; INSERT INTO notes VALUES (4, NULL, 'first'); "
                     "UPDATE notes SET owner = 'a' WHERE id = 4; "
                     "INSERT INTO notes VALUES (5, 'a', 'fine first'); "
                     "UPDATE notes SET owner = NULL, title = 'then not' WHERE id = 5; COMMIT")
        worker.wait_caught_up(dsn)
        assert open_letters(dsn) == [('["5"]', "update", "then not")]
        assert live(dsn) == ["1", "2", "4", "5"]  # 5 keeps its last good document until fixed
        assert query(dsn, "SELECT title FROM slipstream.docs WHERE object_id = '5'") == [("fine first",)]

        # A TRUNCATE settles every letter of the table.
        run_sql(dsn, "INSERT INTO notes VALUES (6, NULL, 'six')")
        worker.wait_caught_up(dsn)
        assert [r[0] for r in open_letters(dsn)] == ['["5"]', '["6"]']
        run_sql(dsn, "TRUNCATE notes")
        worker.wait_caught_up(dsn)
        assert open_letters(dsn) == [] and live(dsn) == []

    status = cli("status", "--config", str(config), "--json", cwd=tmp_path)
    assert status.returncode == 0 and json.loads(status.stdout)["dead_letters"] == 0, shown(status)
    # The letters are kept, settled, for the record.
    assert query(dsn, "SELECT DISTINCT row_key FROM slipstream.dead_letters "
                      "WHERE resolved_at IS NOT NULL ORDER BY 1") == [
        ('["1"]',), ('["3"]',), ('["5"]',), ('["6"]',)]
