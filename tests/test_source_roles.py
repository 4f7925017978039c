"""A replication role that is not the tables' owner, as a least-privilege setup has it.

Regressions: such a role could not create the publication (`must be owner of table
notes`, with nothing saying what to run instead); and on a table with row-level
security (Supabase enables it on every table) the copy read only the rows the role's
policies showed while the stream carried every row, so the rows the policies hid were
missing from the index, without a word, until each one changed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from .cli_harness import WorkerProcess, cli, live_docs, query, run_sql, shown, slot_row, write_config

TABLE = """
[tables."public.notes"]
object_type = "note"
title = "{title}"
partition = "{owner}"
"""


@pytest.fixture
def role(pg_server, pg_dsn: str) -> Iterator[str]:
    """A LOGIN REPLICATION role with SELECT on `notes` and CREATE on the database, no more."""
    name = "repl_" + uuid.uuid4().hex[:8]
    (database,) = query(pg_dsn, "SELECT current_database()")[0]
    run_sql(pg_dsn, "CREATE TABLE notes (id int PRIMARY KEY, owner text, title text)",
            "INSERT INTO notes VALUES (1, 'u1', 'one'), (2, 'u2', 'two')",
            f"CREATE ROLE {name} LOGIN REPLICATION", f"GRANT CREATE ON DATABASE {database} TO {name}",
            f"GRANT USAGE, CREATE ON SCHEMA public TO {name}", f"GRANT SELECT ON notes TO {name}")
    try:
        yield name
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(name)))
        with psycopg.connect(pg_server.admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def config_as(role: str, dsn: str, tmp_path: Path) -> Path:
    return write_config(tmp_path / "slipstream.toml", psycopg.conninfo.make_conninfo(dsn, user=role), TABLE)


def test_a_role_that_may_not_create_the_publication_is_told_what_to_have_run(
        pg_dsn: str, role: str, tmp_path: Path) -> None:
    config = config_as(role, pg_dsn, tmp_path)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 2, shown(setup)
    statement = ('CREATE PUBLICATION "slipstream" FOR TABLE "public"."notes" WITH '
                 "(publish_via_partition_root = true")
    assert f"configuration error: role '{role}' may not run `{statement}" in setup.stderr, shown(setup)
    assert "must be owner of table notes" in setup.stderr, shown(setup)
    assert slot_row(pg_dsn) is None

    # The owner runs it as told; the role's next setup uses it.
    run_sql(pg_dsn, setup.stderr.split("Have one run `")[1].split("`")[0])
    again = cli("setup", "--config", str(config), cwd=tmp_path)
    assert again.returncode == 0 and "publication: present" in again.stdout, shown(again)
    assert set(live_docs(pg_dsn, "note")) == {"1", "2"}


def test_row_level_security_that_would_hide_rows_from_the_copy_is_refused(
        pg_dsn: str, role: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    run_sql(dsn, "ALTER TABLE notes ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY only_u1 ON notes FOR SELECT USING (owner = 'u1')",
            "CREATE PUBLICATION slipstream FOR TABLE notes")
    config = config_as(role, dsn, tmp_path)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 2, shown(setup)
    assert (f"table public.notes has row-level security that applies to role '{role}'"
            in setup.stderr), shown(setup)
    assert f'ALTER ROLE "{role}" BYPASSRLS;' in setup.stderr, shown(setup)
    assert slot_row(dsn) is None

    run_sql(dsn, f"ALTER ROLE {role} BYPASSRLS")
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    assert set(live_docs(dsn, "note")) == {"1", "2"}  # the row its policy hides too
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "INSERT INTO notes VALUES (3, 'u3', 'three')")
        worker.wait_caught_up(dsn)
    assert set(live_docs(dsn, "note")) == {"1", "2", "3"}


def test_row_level_security_does_not_apply_to_a_superuser(pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    run_sql(dsn, "CREATE TABLE notes (id int PRIMARY KEY, owner text, title text)",
            "INSERT INTO notes VALUES (1, 'u1', 'one'), (2, 'u2', 'two')",
            "ALTER TABLE notes ENABLE ROW LEVEL SECURITY")
    config = write_config(tmp_path / "slipstream.toml", dsn, TABLE)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    assert set(live_docs(dsn, "note")) == {"1", "2"}
