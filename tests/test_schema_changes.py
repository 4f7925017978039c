"""Schema changes on a followed table: columns come and go; a rename stops the worker.

Regression for renames: after `ALTER TABLE notes RENAME TO …`, pgoutput sends the
table's changes under its new name, which no mapper was registered for, so they were
dropped without a word while the worker reported itself healthy.
"""

from __future__ import annotations

from pathlib import Path

from .cli_harness import WorkerProcess, cli, live_docs, query, run_sql, shown, write_config

TABLE = """
[tables."public.notes"]
object_type = "note"
title = "{title}"
body = "{body}"
partition = "{owner}"
"""


def set_up_notes(dsn: str, tmp_path: Path, extra_column: str, first: str) -> Path:
    """A `notes` table holding row 1, configured and set up; the config's path."""
    run_sql(dsn, f"CREATE TABLE notes (id int PRIMARY KEY, owner text, title text, body text{extra_column})",
            f"INSERT INTO notes VALUES (1, 'u1', 'first', {first})")
    config = write_config(tmp_path / "slipstream.toml", dsn, TABLE)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    return config


def test_columns_added_and_dropped_while_streaming_keep_mapping(pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    config = set_up_notes(dsn, tmp_path, ", junk int", "'existing row', 7")
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "ALTER TABLE notes ADD COLUMN tags text[] DEFAULT '{x}'",
                "INSERT INTO notes VALUES (2, 'u1', 'second', 'after a column was added', 8, '{a,b}')",
                "ALTER TABLE notes DROP COLUMN junk",
                "UPDATE notes SET body = 'edited after a column was dropped' WHERE id = 1",
                "ALTER TABLE notes ALTER COLUMN title TYPE varchar(80)",
                "INSERT INTO notes VALUES (3, 'u2', 'third', 'after a type change', '{c}')")
        worker.wait_caught_up(dsn)
    assert live_docs(dsn, "note") == {
        "1": ("u1", "first", "edited after a column was dropped"),
        "2": ("u1", "second", "after a column was added"),
        "3": ("u2", "third", "after a type change"),
    }


def test_a_renamed_table_stops_the_worker_until_the_configuration_follows(pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    config = set_up_notes(dsn, tmp_path, "", "'copied'")
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "INSERT INTO notes VALUES (2, 'u1', 'second', 'before the rename')")
        worker.wait_caught_up(dsn)
        run_sql(dsn, "ALTER TABLE notes RENAME TO notebook",
                "INSERT INTO notebook VALUES (3, 'u2', 'third', 'after the rename')")
        code = worker.proc.wait(timeout=30)
        output = worker.output()
    assert code == 2, output
    assert ("configuration error: table 'public.notes' was renamed to 'public.notebook'" in output
            and 'Rename its section to [tables."public.notebook"]' in output), output
    assert set(live_docs(dsn, "note")) == {"1", "2"}  # nothing after the rename was dropped as applied

    # The same configuration is refused at start: the table it names is gone.
    refused = cli("setup", "--config", str(config), cwd=tmp_path)
    assert refused.returncode == 2 and "table 'public.notes' does not exist" in refused.stderr, shown(refused)

    write_config(config, dsn, TABLE.replace("public.notes", "public.notebook"))
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "UPDATE notebook SET body = 'edited under its new name' WHERE id = 1")
        worker.wait_caught_up(dsn)
        worker.wait_for("the copy under the new name", lambda: "3" in live_docs(dsn, "note"))
    assert live_docs(dsn, "note") == {
        "1": ("u1", "first", "edited under its new name"),
        "2": ("u1", "second", "before the rename"),
        "3": ("u2", "third", "after the rename"),
    }


def test_a_table_swapped_in_under_its_name_is_copied_afresh_and_the_old_ones_changes_skipped(
        pg_dsn: str, tmp_path: Path) -> None:
    """Regression: a table dropped and created again under its name (here swapped in by a
    rename, as bulk reloads do) kept the old table's documents forever, the new table's
    rows were never copied, and the old table's changes still in the slot were applied
    over whatever came after."""
    dsn = pg_dsn
    config = set_up_notes(dsn, tmp_path, "", "'copied'")
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "INSERT INTO notes VALUES (2, 'u1', 'second', 'streamed'), (3, 'u1', 'third', 'streamed')")
        worker.wait_caught_up(dsn)
        assert worker.stop()[0] == 0
    # While the worker is stopped: changes of the old table wait in the slot, then the swap.
    run_sql(dsn, "UPDATE notes SET title = 'old edit' WHERE id = 1", "DELETE FROM notes WHERE id = 2",
            "INSERT INTO notes VALUES (9, 'u1', 'old only', 'never in the new table')",
            "CREATE TABLE notes_new (id int PRIMARY KEY, owner text, title text, body text)",
            "INSERT INTO notes_new VALUES (1, 'u2', 'new one', 'reloaded'), (2, 'u2', 'new two', 'reloaded'), "
            "(5, 'u2', 'new five', 'reloaded')",
            "DROP TABLE notes", "ALTER TABLE notes_new RENAME TO notes")

    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    assert "public.notes: dropped and created again, or keyed by other columns, since its copy" in setup.stdout, shown(setup)
    assert "snapshot: public.notes: 3 rows" in setup.stdout, shown(setup)
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "INSERT INTO notes VALUES (6, 'u2', 'six', 'streamed into the new table')",
                "UPDATE notes SET body = 'edited in the new table' WHERE id = 5")
        worker.wait_caught_up(dsn)
    assert live_docs(dsn, "note") == {
        "1": ("u2", "new one", "reloaded"),
        "2": ("u2", "new two", "reloaded"),
        "5": ("u2", "new five", "edited in the new table"),
        "6": ("u2", "six", "streamed into the new table"),
    }


def test_a_table_swapped_in_while_the_worker_runs_is_copied_and_followed_without_a_restart(
        pg_dsn: str, tmp_path: Path) -> None:
    """Regression: a bulk reload that swaps a new table in under a configured name while
    the worker ran (create, fill, drop the old, rename) went unseen: the new table is
    not in the publication, so none of its rows or changes reached the index until a
    restart. The worker now notices the new OID, sets up again and streams on."""
    dsn = pg_dsn
    run_sql(dsn, "CREATE TABLE notes (id int PRIMARY KEY, owner text, title text, body text)",
            "INSERT INTO notes VALUES (1, 'u1', 'first', 'copied'), (2, 'u1', 'second', 'copied')")
    config = write_config(tmp_path / "slipstream.toml", dsn, TABLE, worker={"metrics_interval_seconds": 0.3})
    assert cli("setup", "--config", str(config), cwd=tmp_path).returncode == 0
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "UPDATE notes SET body = 'streamed' WHERE id = 1")
        worker.wait_caught_up(dsn)
        run_sql(dsn, "CREATE TABLE notes_new (id int PRIMARY KEY, owner text, title text, body text)",
                "INSERT INTO notes_new VALUES (1, 'u2', 'new one', 'reloaded'), (7, 'u2', 'new seven', 'reloaded')",
                "BEGIN; DROP TABLE notes; ALTER TABLE notes_new RENAME TO notes; COMMIT;")
        worker.wait_for("the new table's rows", lambda: set(live_docs(dsn, "note")) == {"1", "7"})
        assert any(e.get("event") == "table_replaced" and e.get("tables") == ["public.notes"]
                   for e in worker.events()), worker.output()
        run_sql(dsn, "INSERT INTO notes VALUES (8, 'u2', 'eight', 'streamed into the new table')",
                "UPDATE notes SET body = 'edited in the new table' WHERE id = 7")
        worker.wait_for("the new table's changes", lambda: live_docs(dsn, "note").get("7", ("",) * 3)[2]
                        == "edited in the new table" and "8" in live_docs(dsn, "note"))
        assert worker.stop()[0] == 0
    assert live_docs(dsn, "note") == {
        "1": ("u2", "new one", "reloaded"),
        "7": ("u2", "new seven", "edited in the new table"),
        "8": ("u2", "eight", "streamed into the new table"),
    }
    assert query(dsn, "SELECT count(*) FROM slipstream.dead_letters") == [(0,)]


def test_a_new_primary_key_while_the_worker_runs_rekeys_the_table_without_a_restart(
        pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    run_sql(dsn, "CREATE TABLE notes (id int PRIMARY KEY, code text NOT NULL, owner text, title text, "
                 "body text)",
            "INSERT INTO notes VALUES (1, 'n-1', 'u1', 'one', 'b'), (2, 'n-2', 'u1', 'two', 'b')")
    config = write_config(tmp_path / "slipstream.toml", dsn, TABLE, worker={"metrics_interval_seconds": 0.3})
    assert cli("setup", "--config", str(config), cwd=tmp_path).returncode == 0
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "BEGIN; ALTER TABLE notes DROP CONSTRAINT notes_pkey; "
                     "ALTER TABLE notes ADD PRIMARY KEY (code); COMMIT;")
        worker.wait_for("the documents keyed by the new key",
                        lambda: set(live_docs(dsn, "note")) == {"n-1", "n-2"})
        run_sql(dsn, "UPDATE notes SET title = 'two, edited' WHERE code = 'n-2'",
                "INSERT INTO notes VALUES (3, 'n-3', 'u1', 'three', 'b')")
        worker.wait_for("changes under the new key", lambda: live_docs(dsn, "note").get(
            "n-2", ("", ""))[1] == "two, edited" and "n-3" in live_docs(dsn, "note"))
        assert worker.stop()[0] == 0
    assert set(live_docs(dsn, "note")) == {"n-1", "n-2", "n-3"}
    assert query(dsn, "SELECT key_columns FROM slipstream.snapshot_progress") == [(["code"],)]


def test_a_copy_recorded_without_its_tables_oid_adopts_it_and_is_not_repeated(
        pg_dsn: str, tmp_path: Path) -> None:
    """Search schemas made before the OID was recorded: the table is the same one."""
    dsn = pg_dsn
    config = set_up_notes(dsn, tmp_path, "", "'copied'")
    run_sql(dsn, "UPDATE slipstream.snapshot_progress SET relid = NULL")
    again = cli("setup", "--config", str(config), cwd=tmp_path)
    assert again.returncode == 0 and "dropped and created again" not in again.stdout, shown(again)
    assert "snapshot:" not in again.stdout, shown(again)  # nothing copied again
    assert query(dsn, "SELECT relid = 'public.notes'::regclass, key_columns "
                      "FROM slipstream.snapshot_progress") == [(True, ["id"])]
    assert set(live_docs(dsn, "note")) == {"1"}


def test_a_replica_identity_full_table_is_keyed_by_its_primary_key(pg_dsn: str, tmp_path: Path) -> None:
    """Regression: with REPLICA IDENTITY FULL (set to get old values, as Supabase Realtime
    and many CDC consumers ask) a row was keyed by all of its columns. Its document's id
    was the JSON of every value, so any edit made it another document (the old one
    tombstoned), and a row with long text went to dead letters (`object_id must be at
    most 512 characters`). The primary key names the row whatever the replica identity."""
    dsn = pg_dsn
    run_sql(dsn, "CREATE TABLE notes (id int PRIMARY KEY, owner text, title text, body text)",
            "ALTER TABLE notes REPLICA IDENTITY FULL",
            "INSERT INTO notes VALUES (1, 'u1', 'first', repeat('long text ', 200)), (2, 'u1', 'second', 'b')")
    config = write_config(tmp_path / "slipstream.toml", dsn, TABLE)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "UPDATE notes SET title = 'first, edited' WHERE id = 1",
                "INSERT INTO notes VALUES (3, 'u2', 'third', repeat('more text ', 300))",
                "UPDATE notes SET id = 20, title = 'second, renumbered' WHERE id = 2")
        worker.wait_caught_up(dsn)
        docs = live_docs(dsn, "note")
        assert {k: v[:2] for k, v in docs.items()} == {
            "1": ("u1", "first, edited"), "3": ("u2", "third"), "20": ("u1", "second, renumbered")}
        run_sql(dsn, "DELETE FROM notes WHERE id = 3")
        worker.wait_caught_up(dsn)
    assert query(dsn, "SELECT count(*) FROM slipstream.dead_letters") == [(0,)]
    assert set(live_docs(dsn, "note")) == {"1", "20"}
    assert query(dsn, "SELECT object_id FROM slipstream.docs WHERE deleted ORDER BY 1") == [("2",), ("3",)]


def test_another_key_or_a_copy_keyed_by_every_column_is_keyed_anew(pg_dsn: str, tmp_path: Path) -> None:
    """The key a table was copied with is recorded; when it changes, the documents keyed
    by the old one are tombstoned and the table is copied afresh under the new one. A
    REPLICA IDENTITY FULL table copied before keys were recorded was keyed by all of
    its columns, and is keyed anew too."""
    dsn = pg_dsn
    run_sql(dsn, "CREATE TABLE notes (id int PRIMARY KEY, code text NOT NULL UNIQUE, owner text, "
                 "title text, body text)",
            "INSERT INTO notes VALUES (1, 'n-1', 'u1', 'one', 'b'), (2, 'n-2', 'u1', 'two', 'b')")
    config = write_config(tmp_path / "slipstream.toml", dsn, TABLE)
    assert cli("setup", "--config", str(config), cwd=tmp_path).returncode == 0
    assert set(live_docs(dsn, "note")) == {"1", "2"}

    run_sql(dsn, "ALTER TABLE notes DROP CONSTRAINT notes_pkey", "ALTER TABLE notes ADD PRIMARY KEY (code)")
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    assert "public.notes: dropped and created again, or keyed by other columns" in setup.stdout, shown(setup)
    assert set(live_docs(dsn, "note")) == {"n-1", "n-2"}
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "UPDATE notes SET title = 'two, edited' WHERE code = 'n-2'")
        worker.wait_caught_up(dsn)
    assert live_docs(dsn, "note")["n-2"][1] == "two, edited"

    # As a search schema from before keys were recorded holds a FULL table's copy.
    run_sql(dsn, "ALTER TABLE notes REPLICA IDENTITY FULL",
            "UPDATE slipstream.snapshot_progress SET key_columns = NULL")
    again = cli("setup", "--config", str(config), cwd=tmp_path)
    assert again.returncode == 0 and "keyed by other columns" in again.stdout, shown(again)
    assert set(live_docs(dsn, "note")) == {"n-1", "n-2"}
    assert query(dsn, "SELECT key_columns FROM slipstream.snapshot_progress") == [(["code"],)]
    # Recorded now: the next setup copies nothing.
    last = cli("setup", "--config", str(config), cwd=tmp_path)
    assert last.returncode == 0 and "snapshot:" not in last.stdout, shown(last)


def test_a_copy_keyed_by_a_time_zone_column_before_keys_were_recorded_is_keyed_anew(
        pg_dsn: str, tmp_path: Path) -> None:
    """Keys are read in UTC now; a table keyed by a timestamptz (a time-partitioned table's
    primary key must hold its partition key) was keyed in the server's time zone before
    keys were recorded, so its documents' ids were other strings: it is copied afresh."""
    dsn = pg_dsn
    (database,) = query(dsn, "SELECT current_database()")[0]
    run_sql(dsn, f"ALTER DATABASE {database} SET TimeZone = 'Europe/Berlin'",
            "CREATE TABLE events (id int, at timestamptz, owner text, title text, body text, "
            "PRIMARY KEY (id, at))",
            "INSERT INTO events VALUES (1, '2026-12-03 10:00+01', 'u1', 'one', 'b')")
    config = write_config(tmp_path / "slipstream.toml", dsn, TABLE.replace("public.notes", "public.events"))
    assert cli("setup", "--config", str(config), cwd=tmp_path).returncode == 0
    assert set(live_docs(dsn, "note")) == {"1:2026-12-03T09\\:00\\:00+00\\:00"}  # in UTC
    run_sql(dsn, "UPDATE slipstream.snapshot_progress SET key_columns = NULL")  # as before keys were recorded
    again = cli("setup", "--config", str(config), cwd=tmp_path)
    assert again.returncode == 0 and "keyed by other columns" in again.stdout, shown(again)
    assert query(dsn, "SELECT key_columns FROM slipstream.snapshot_progress") == [(["id", "at"],)]
    last = cli("setup", "--config", str(config), cwd=tmp_path)
    assert last.returncode == 0 and "snapshot:" not in last.stdout, shown(last)
