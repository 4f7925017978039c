"""`slipstream teardown`: the slot, the publication and the search schema go, and only
when nothing still needs them; a refusal drops nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psycopg
import pytest
from slipstream.worker.config import load_config
from slipstream.worker.errors import TeardownRefusedError
from slipstream.worker.pgtypes import source_conninfo
from slipstream.worker.teardown import plan_teardown, run_teardown

from .cli_harness import SLOT, WorkerProcess, cli, command, environ, query, run_sql, shown, write_config

TABLES = """
[tables."public.notes"]
object_type = "note"
title = "{title}"
partition = "p"
"""


def objects(dsn: str, schema: str = "slipstream") -> tuple[bool, bool, bool]:
    """(slot, publication, search schema) exist."""
    slot = query(dsn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (SLOT,))[0][0]
    pub = query(dsn, "SELECT count(*) FROM pg_publication WHERE pubname = 'slipstream'")[0][0]
    schema_n = query(dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,))[0][0]
    return bool(slot), bool(pub), bool(schema_n)


def set_up(dsn: str, tmp_path: Path, extra: str = "") -> Path:
    run_sql(dsn, "CREATE TABLE public.notes (id int PRIMARY KEY, title text)",
            "INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 5) g")
    config = write_config(tmp_path / "slipstream.toml", dsn, TABLES, extra=extra)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    return config


def test_teardown_refuses_a_running_worker_then_drops_everything(pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    config = set_up(dsn, tmp_path)
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        refused = cli("teardown", "--config", str(config), "--yes", cwd=tmp_path)
        assert refused.returncode == 1, shown(refused)
        assert "in use by a running worker" in refused.stderr and "Nothing was dropped" in refused.stderr
        assert objects(dsn) == (True, True, True)
        run_sql(dsn, "INSERT INTO notes VALUES (6, 'still indexed')")
        worker.wait_caught_up(dsn)  # the refusal left the worker streaming

    done = cli("teardown", "--config", str(config), "--yes", cwd=tmp_path)
    assert done.returncode == 0, shown(done)
    assert "replication slot 'slipstream': drop (it holds back" in done.stdout
    assert "search schema 'slipstream': drop (6 documents" in done.stdout, shown(done)
    assert objects(dsn) == (False, False, False)
    # The app's own table is untouched.
    assert query(dsn, "SELECT count(*) FROM notes")[0][0] == 6

    again = cli("teardown", "--config", str(config), "--yes", cwd=tmp_path)
    assert again.returncode == 0 and "nothing to drop" in again.stdout, shown(again)

    # A fresh setup starts over: a new slot and a full copy.
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    assert query(dsn, "SELECT count(*) FROM slipstream.docs WHERE NOT deleted")[0][0] == 6


def test_teardown_asks_first_and_can_keep_the_index_or_the_publication(pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    config = set_up(dsn, tmp_path)

    def teardown(*args: str, answer: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command("teardown", "--config", str(config), *args), cwd=tmp_path,
                              env=environ(), input=answer, capture_output=True, text=True, timeout=60)

    declined = teardown(answer="n\n")
    assert declined.returncode == 1 and "drop these?" in declined.stdout, shown(declined)
    assert objects(dsn) == (True, True, True)

    kept = teardown("--keep-index", "--keep-publication", answer="y\n")
    assert kept.returncode == 0, shown(kept)
    assert "dropped: replication slot 'slipstream'" in kept.stdout
    assert objects(dsn) == (False, True, True)
    # The index still answers searches (stale from now on).
    assert query(dsn, "SELECT count(*) FROM slipstream.docs WHERE NOT deleted")[0][0] == 5

    rest = teardown(answer="y\n")
    assert rest.returncode == 0, shown(rest)
    assert "replication slot 'slipstream': not found" in rest.stdout
    assert objects(dsn) == (False, False, False)


def test_teardown_never_drops_a_schema_shared_with_the_application(pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    run_sql(dsn, "CREATE SCHEMA app", "CREATE TABLE app.users (id int PRIMARY KEY)",
            "CREATE SEQUENCE app.invoice_numbers")
    config = set_up(dsn, tmp_path, extra='[search]\nschema = "app"\n')
    assert query(dsn, "SELECT count(*) FROM app.docs")[0][0] == 5

    refused = cli("teardown", "--config", str(config), "--yes", cwd=tmp_path)
    assert refused.returncode == 1, shown(refused)
    assert "objects slipstream did not make (invoice_numbers, users)" in refused.stderr, shown(refused)
    assert objects(dsn, "app") == (True, True, True)  # nothing dropped, the slot included

    partial = cli("teardown", "--config", str(config), "--yes", "--keep-index", cwd=tmp_path)
    assert partial.returncode == 0, shown(partial)
    assert objects(dsn, "app") == (False, False, True)
    assert query(dsn, "SELECT count(*) FROM app.users")[0][0] == 0  # still there


def test_teardown_refuses_a_slot_of_another_database(pg_dsn: str, other_dsn: str, tmp_path: Path) -> None:
    """Slot names are the server's, not a database's: one of that name made for another
    database is not this configuration's to drop."""
    run_sql(pg_dsn, "CREATE TABLE public.notes (id int PRIMARY KEY, title text)")
    config = write_config(tmp_path / "slipstream.toml", pg_dsn, TABLES)
    run_sql(other_dsn, f"SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')")
    other = psycopg.conninfo.conninfo_to_dict(other_dsn)["dbname"]
    refused = cli("teardown", "--config", str(config), "--yes", cwd=tmp_path)
    assert refused.returncode == 1, shown(refused)
    assert f"belongs to database '{other}'" in refused.stderr, shown(refused)
    assert query(other_dsn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s "
                            "AND database = current_database()", (SLOT,))[0][0] == 1


def test_a_search_schema_in_use_is_reported_with_what_was_dropped(pg_dsn: str, tmp_path: Path) -> None:
    """The slot goes first (it is what costs the source); a schema still locked by a
    reader is reported, with what was dropped so far, and a second run finishes."""
    config = load_config(set_up(pg_dsn, tmp_path))
    source_dsn, search_dsn = source_conninfo(pg_dsn), config.search.resolve_dsn(config.source)

    def plan():
        return plan_teardown(source_dsn, search_dsn, slot=SLOT, publication="slipstream",
                             schema="slipstream")

    with psycopg.connect(pg_dsn) as reader:
        reader.execute("SELECT count(*) FROM slipstream.docs")  # holds its lock until the end
        with pytest.raises(TeardownRefusedError) as info:
            run_teardown(plan(), source_dsn, search_dsn, lock_timeout="200ms")
    assert "is in use" in str(info.value) and "dropped so far: replication slot 'slipstream', " \
        "publication 'slipstream'" in str(info.value)
    assert objects(pg_dsn) == (False, False, True)
    finished = run_teardown(plan(), source_dsn, search_dsn)
    assert finished.dropped == ["search schema 'slipstream'"]
    assert objects(pg_dsn) == (False, False, False)
