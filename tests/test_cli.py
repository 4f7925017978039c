"""The `slipstream` command end to end, as a deployment runs it: a TOML file, subprocesses.

Zero-code indexing with `setup` and `status`, `run` streaming until SIGTERM, the health
endpoints, configuration mistakes, and dead letters from a Python mapper retried after
a fix.
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from slipstream.index import HashingEmbedder, PostgresBackend, SearchIndex

from .cli_harness import (
    SLOT,
    WorkerProcess,
    checkpoint_lsn,
    cli,
    command,
    environ,
    free_port,
    live_docs,
    query,
    run_sql,
    shown,
    slot_row,
    wal_insert_lsn,
    write_config,
)

ITEMS_DDL = """
CREATE TABLE public.items (
    id serial PRIMARY KEY,
    owner text NOT NULL DEFAULT 'alice',
    title text,
    body text
)
"""

ITEMS_TOML = """
[tables."public.items"]
object_type = "item"
title = "{title}"
body = "{body}"
partition = "{owner}"
"""


def expected_items(dsn: str) -> dict[str, tuple[str, str, str]]:
    """What the TOML above makes of every row of public.items: id -> (partition, title, body)."""
    return {str(i): (owner, title or "", body or "")
            for i, owner, title, body in query(dsn, "SELECT id, owner, title, body FROM items")}


def search_ids(dsn: str, text: str, partition: str) -> list[str]:
    backend = PostgresBackend(dsn, spaces={"local": 16})
    try:
        index = SearchIndex(backend, HashingEmbedder(16))
        return [r.object_id for r in index.search(text, partition=partition)]
    finally:
        backend.close()


@pytest.fixture
def items(pg_dsn: str) -> str:
    run_sql(pg_dsn, ITEMS_DDL)
    return pg_dsn


# -- setup and status --------------------------------------------------------------------

def test_setup_copies_existing_rows_status_reports_them_and_setup_is_idempotent(
        items: str, tmp_path: Path) -> None:
    dsn = items
    run_sql(dsn, "INSERT INTO items (owner, title, body) VALUES "
                 "('alice', 'quantum entanglement', 'spooky action'), "
                 "('alice', 'grocery list', 'apples'), ('bob', 'quarterly plan', 'budget')")
    config = write_config(tmp_path / "slipstream.toml", dsn, ITEMS_TOML)

    first = cli("setup", "--config", str(config), cwd=tmp_path)
    assert first.returncode == 0, shown(first)
    assert "slot: created" in first.stdout
    assert "snapshot: public.items: 3 rows" in first.stdout
    # The copied rows wait for the worker's HNSW indexer (searchable meanwhile).
    assert query(dsn, "SELECT count(*) FROM slipstream.ann_queue") == [(3,)]
    assert live_docs(dsn, "item") == expected_items(dsn)
    assert search_ids(dsn, "quantum", "alice") == ["1"]

    status = cli("status", "--config", str(config), "--json", cwd=tmp_path)
    assert status.returncode == 0, shown(status)
    st = json.loads(status.stdout)
    assert st["slot"]["name"] == SLOT and st["slot"]["active"] is False
    assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", st["slot"]["confirmed_flush_lsn"])
    assert st["checkpoint"] is not None and st["checkpoint"]["last_seq"] == 3
    assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", st["checkpoint"]["lsn"])
    assert st["counts"] == [{"object_type": "item", "live": 3, "tombstones": 0}]
    assert st["snapshot"] == [{"table": "public.items", "rows": 3, "done": True}]
    assert st["dead_letters"] == 0 and st["pending_embeddings"] == 0
    assert st["ann_queue"] == 0  # the library search above drained the queue after its write
    text = cli("status", "--config", str(config), cwd=tmp_path)
    assert text.returncode == 0, shown(text)
    assert f"slot {SLOT}: inactive" in text.stdout and "item" in text.stdout
    assert "awaiting HNSW: 0" in text.stdout

    log_before = query(dsn, "SELECT seq, object_id, op FROM slipstream.changes ORDER BY seq")
    again = cli("setup", "--config", str(config), cwd=tmp_path)
    assert again.returncode == 0, shown(again)
    assert "slot: present" in again.stdout and "publication: present" in again.stdout
    assert "snapshot:" not in again.stdout
    assert query(dsn, "SELECT count(*) FROM pg_replication_slots "
                      "WHERE database = current_database()") == [(1,)]
    log_after = query(dsn, "SELECT seq, object_id, op FROM slipstream.changes ORDER BY seq")
    assert log_after == log_before
    assert live_docs(dsn, "item") == expected_items(dsn)


# -- run until SIGTERM -------------------------------------------------------------------

def test_run_streams_changes_and_sigterm_exits_cleanly_with_the_flush_reported(
        items: str, tmp_path: Path) -> None:
    dsn = items
    run_sql(dsn, "INSERT INTO items (owner, title, body) VALUES "
                 "('alice', 'first note', 'one'), ('bob', 'second note', 'two')")
    config = write_config(tmp_path / "slipstream.toml", dsn, ITEMS_TOML)
    with WorkerProcess(config, cwd=tmp_path) as worker:  # `run` sets up what is missing
        worker.wait_streaming(dsn)
        assert live_docs(dsn, "item") == expected_items(dsn)
        run_sql(dsn, "INSERT INTO items (owner, title, body) "
                     "VALUES ('carol', 'third note', 'three')")
        run_sql(dsn, "UPDATE items SET title = 'first note, edited', owner = 'bob' WHERE id = 1")
        before_delete = wal_insert_lsn(dsn)
        run_sql(dsn, "DELETE FROM items WHERE id = 2")
        worker.wait_for("the search table to match the app table",
                        lambda: live_docs(dsn, "item") == expected_items(dsn))
        assert set(live_docs(dsn, "item")) == {"1", "3"}
        assert search_ids(dsn, "edited", "bob") == ["1"]
        assert search_ids(dsn, "first", "alice") == []

        code, seconds = worker.stop()
        assert code == 0, worker.output()
        assert seconds < 5
    cp = checkpoint_lsn(dsn)
    assert cp > before_delete  # the delete's transaction is in the checkpoint
    stopped = [e for e in worker.events() if e["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["flushed_lsn"] >= cp, worker.output()
    # The walsender handles the last status update and the closed connection on its own
    # time: give it a moment before reading the slot.
    active, confirmed = slot_row(dsn)
    deadline = time.monotonic() + 5
    while (active or confirmed < cp) and time.monotonic() < deadline:
        time.sleep(0.05)
        active, confirmed = slot_row(dsn)
    assert confirmed >= cp, f"slot confirmed {confirmed:X} < checkpoint {cp:X}"
    assert not active


# -- health endpoints --------------------------------------------------------------------

def _applied_upserts(metrics: str) -> float:
    m = re.search(r'^slipstream_applied_changes_total\{op="upsert"\} (\S+)$', metrics, re.MULTILINE)
    assert m, metrics
    return float(m[1])


def test_readyz_once_streaming_and_metrics_count_applied_changes(
        items: str, tmp_path: Path) -> None:
    dsn = items
    port = free_port()
    config = write_config(tmp_path / "slipstream.toml", dsn, ITEMS_TOML, worker={"http_port": port})
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    with WorkerProcess(config, cwd=tmp_path, http=True) as worker:
        worker.wait_for("/readyz to answer 200", ready)
        assert httpx.get(f"{base}/readyz").json() == {"ready": True, "reason": "streaming"}
        assert slot_row(dsn)[0], "ready, but the slot is not active"
        assert httpx.get(f"{base}/healthz").status_code == 200
        before = _applied_upserts(httpx.get(f"{base}/metrics").text)
        run_sql(dsn, "INSERT INTO items (title) VALUES ('a'), ('b')",
                "INSERT INTO items (title) VALUES ('c')")
        worker.wait_for("applied_changes_total to count 3 upserts",
                        lambda: _applied_upserts(httpx.get(f"{base}/metrics").text) >= before + 3)
        assert _applied_upserts(httpx.get(f"{base}/metrics").text) == before + 3
        code, _ = worker.stop()
        assert code == 0, worker.output()


# -- configuration mistakes --------------------------------------------------------------

def test_check_names_a_mistyped_key_and_suggests_the_right_one(tmp_path: Path) -> None:
    config = write_config(tmp_path / "bad.toml", "postgresql://app@localhost/app",
                          ITEMS_TOML.replace('title = "{title}"', 'titel = "{title}"'))
    result = cli("check", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, shown(result)
    assert 'tables."public.items".titel' in result.stderr
    assert "did you mean 'title'" in result.stderr
    assert str(config) in result.stderr


def test_setup_refuses_a_missing_table_and_a_table_without_key(items: str, tmp_path: Path) -> None:
    dsn = items
    missing = write_config(tmp_path / "missing.toml", dsn,
                           ITEMS_TOML.replace("public.items", "public.itemz"))
    result = cli("setup", "--config", str(missing), cwd=tmp_path)
    assert result.returncode == 2, shown(result)
    assert "public.itemz" in result.stderr and "does not exist" in result.stderr

    run_sql(dsn, "CREATE TABLE public.events (at timestamptz, title text)")
    keyless = write_config(tmp_path / "keyless.toml", dsn,
                           ITEMS_TOML.replace("public.items", "public.events"))
    result = cli("setup", "--config", str(keyless), cwd=tmp_path)
    assert result.returncode == 2, shown(result)
    assert "public.events" in result.stderr
    assert "ALTER TABLE public.events REPLICA IDENTITY" in result.stderr
    # Refused before anything was created: no slot is left behind to pin WAL.
    assert slot_row(dsn) is None
    assert query(dsn, "SELECT count(*) FROM pg_publication") == [(0,)]


def test_a_slot_name_taken_elsewhere_is_refused_and_the_new_name_then_sets_up(
        items: str, other_dsn: str, tmp_path: Path) -> None:
    """Regression: `setup` refused a slot name another database used (slot names are
    cluster-wide: "set [source] slot to another name"), but only after it had claimed the
    search schema's change log for that name; with the name changed as told, the next
    `setup` was refused again (`SlotConflictError`) until the claim was deleted by hand.
    The name is now checked before anything is made, and a claim whose slot never wrote
    anything and runs nowhere passes to the new name."""
    dsn = items
    run_sql(other_dsn, "SELECT pg_create_logical_replication_slot('slipstream', 'pgoutput')")
    run_sql(dsn, "INSERT INTO items (owner, title, body) VALUES ('alice', 'first note', 'x')")
    config = write_config(tmp_path / "slipstream.toml", dsn, ITEMS_TOML)
    refused = cli("setup", "--config", str(config), cwd=tmp_path)
    assert refused.returncode == 2, shown(refused)
    assert "already exists for database" in refused.stderr, shown(refused)
    assert query(dsn, "SELECT count(*) FROM pg_publication") == [(0,)]  # refused before it

    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("\n\n[spaces]", '\nslot = "mine"\n\n[spaces]', 1),
                      encoding="utf-8")
    renamed = cli("setup", "--config", str(config), cwd=tmp_path)
    assert renamed.returncode == 0, shown(renamed)
    assert query(dsn, "SELECT slot FROM slipstream.changelog_writer") == [("mine",)]
    assert query(dsn, "SELECT title FROM slipstream.docs") == [("first note",)]

    # A claim whose slot did write is kept: a third name is refused, naming the holder.
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace('slot = "mine"', 'slot = "third"'), encoding="utf-8")
    third = cli("setup", "--config", str(config), cwd=tmp_path)
    assert third.returncode != 0 and "written by slot 'mine'" in third.stderr, shown(third)
    assert query(dsn, "SELECT slot FROM slipstream.changelog_writer") == [("mine",)]
    assert query(dsn, "SELECT slot_name FROM pg_replication_slots "
                      "WHERE database = current_database()") == [("mine",)]


def test_setup_refuses_id_columns_that_need_not_identify_a_row(items: str, tmp_path: Path) -> None:
    dsn = items
    config = write_config(tmp_path / "slipstream.toml", dsn,
                          ITEMS_TOML + 'id_columns = ["owner"]\n')
    result = cli("setup", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, shown(result)
    assert 'tables."public.items".id_columns' in result.stderr
    assert "CREATE UNIQUE INDEX ON public.items (owner)" in result.stderr
    assert slot_row(dsn) is None  # refused before anything was made
    run_sql(dsn, "CREATE UNIQUE INDEX ON items (owner)")  # as the message says: now it does
    result = cli("setup", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, shown(result)


def test_setup_names_the_open_transaction_a_new_slot_waits_for(items: str, tmp_path: Path) -> None:
    """Regression: a new slot waits for every transaction open on the server to end (it
    must see each from its start); with one left open (a forgotten BEGIN in psql),
    `setup` waited without a word. It now names the session, and goes on once it ends."""
    dsn = items
    config = write_config(tmp_path / "slipstream.toml", dsn, ITEMS_TOML)
    blocker = psycopg.connect(dsn, application_name="forgotten-psql")
    blocker.execute("INSERT INTO items (title) VALUES ('open')")  # a transaction that wrote
    pid = blocker.info.backend_pid
    setup = subprocess.Popen(command("setup", "--config", str(config)), cwd=tmp_path, env=environ(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The notice comes while setup still waits (without it, nothing comes: fail, not hang).
        ready, _, _ = select.select([setup.stdout], [], [], 30)
        assert ready, "setup printed nothing while it waited for the open transaction"
        line = setup.stdout.readline()
        assert line.startswith("slot: waiting for 1 transaction open on the server to end"), line
        assert f"pid {pid} (user " in line and "app forgotten-psql, idle in transaction" in line, line
        assert "INSERT INTO items (title) VALUES ('open')" in line, line
        assert setup.poll() is None
        blocker.commit()
        out, err = setup.communicate(timeout=60)
    finally:
        blocker.close()
        if setup.poll() is None:
            setup.kill()
            setup.wait()
    assert setup.returncode == 0, (out, err)
    assert "slot: created" in out and "snapshot: public.items: 1 rows" in out


@pytest.mark.parametrize(("ddl", "name", "message"), [
    ("CREATE VIEW recent AS SELECT * FROM items", "public.recent",
     "'public.recent' is a view; logical replication carries only tables' changes"),
    ("CREATE MATERIALIZED VIEW recent AS SELECT * FROM items", "public.recent",
     "'public.recent' is a materialized view"),
    ("CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY, title text)", "public.scratch",
     "table 'public.scratch' is UNLOGGED: its changes are not written to the WAL"),
    ("CREATE TABLE \"Items2\" (id int PRIMARY KEY, title text)", "public.items2",
     "table 'public.items2' does not exist in the source database; fix the [tables] key or "
     "create the table; did you mean 'public.Items2'? (names are case-sensitive)"),
])
def test_setup_says_why_a_relation_cannot_be_followed(items: str, tmp_path: Path, ddl: str, name: str,
                                                      message: str) -> None:
    run_sql(items, ddl)
    config = write_config(tmp_path / "slipstream.toml", items, ITEMS_TOML.replace("public.items", name))
    result = cli("setup", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, shown(result)
    assert message in result.stderr, shown(result)
    assert slot_row(items) is None and query(items, "SELECT count(*) FROM pg_publication") == [(0,)]


def test_a_database_error_no_command_expects_is_one_line_not_a_traceback(
        items: str, tmp_path: Path) -> None:
    dsn = items
    config = write_config(tmp_path / "slipstream.toml", dsn, ITEMS_TOML)
    assert cli("setup", "--config", str(config), cwd=tmp_path).returncode == 0
    run_sql(dsn, "DROP TABLE slipstream.dead_letters")  # the worker's state, damaged by hand
    result = cli("deadletter", "list", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1, shown(result)
    assert result.stderr == ('error: the database stopped the command: relation '
                             '"slipstream.dead_letters" does not exist (SQLSTATE 42P01)\n'), shown(result)


def test_a_database_that_does_not_answer_is_named_as_unreachable(tmp_path: Path) -> None:
    """Regression: a server that was down (or a DSN naming the wrong port) was reported as
    "the database stopped the command: connection failed …", as if it had refused it."""
    config = write_config(tmp_path / "slipstream.toml", f"host=127.0.0.1 port={free_port()} "
                          "dbname=app user=app connect_timeout=5", ITEMS_TOML)
    for command in (["setup"], ["status"], ["run", "--no-http"]):
        result = cli(*command, "--config", str(config), cwd=tmp_path)
        assert result.returncode == 1, shown(result)  # not 2: a supervisor restarts it
        assert result.stderr.startswith("error: cannot reach the database: connection failed"), \
            shown(result)
        assert "Connection refused" in result.stderr and "Traceback" not in result.stderr


# -- dead letters ------------------------------------------------------------------------

MAPPER_MODULE = '''
import os

from slipstream.index import IndexDoc
from slipstream.worker.mapping import register


@register("public.items")
def item_docs(row, op):
    if row["title"] == "boom" and os.environ.get("FIXED") != "1":
        raise RuntimeError("cannot map a boom")
    return [IndexDoc("item", str(row["id"]), title=row["title"] or "", body=row["body"] or "",
                     partition=row["owner"])]
'''


def test_python_mapper_dead_letters_are_listed_and_resolved_by_retry_after_the_fix(
        items: str, tmp_path: Path) -> None:
    dsn = items
    (tmp_path / "item_mappers.py").write_text(MAPPER_MODULE)
    config = write_config(tmp_path / "slipstream.toml", dsn, "",
                          worker={"mapper_modules": ["item_mappers"]})
    env = environ(pythonpath=tmp_path)
    with WorkerProcess(config, cwd=tmp_path, env=env) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "INSERT INTO items (title, body) VALUES "
                     "('fine one', 'x'), ('boom', 'y'), ('fine two', 'z')")
        worker.wait_caught_up(dsn)
        listed = cli("deadletter", "list", "--config", str(config), cwd=tmp_path, env=env)
        assert listed.returncode == 0, shown(listed)
        assert "public.items insert key=[\"2\"]" in listed.stdout, listed.stdout
        assert "cannot map a boom" in listed.stdout
        assert len(re.findall(r"^#\d+ ", listed.stdout, re.MULTILINE)) == 1
        assert sorted(live_docs(dsn, "item")) == ["1", "3"]
        code, _ = worker.stop()
        assert code == 0, worker.output()

    # Retrying before the fix fails again and leaves one open dead letter, not two.
    still = cli("deadletter", "retry", "--config", str(config), cwd=tmp_path, env=env)
    assert still.returncode == 1, shown(still)
    assert "resolved 0, still failing 1" in still.stdout
    listed = cli("deadletter", "list", "--config", str(config), cwd=tmp_path, env=env)
    assert len(re.findall(r"^#\d+ ", listed.stdout, re.MULTILINE)) == 1, listed.stdout

    fixed = environ({"FIXED": "1"}, pythonpath=tmp_path)
    retried = cli("deadletter", "retry", "--config", str(config), cwd=tmp_path, env=fixed)
    assert retried.returncode == 0, shown(retried)
    assert "resolved 1, still failing 0" in retried.stdout
    assert live_docs(dsn, "item")["2"] == ("alice", "boom", "y")
    assert search_ids(dsn, "boom", "alice") == ["2"]
    listed = cli("deadletter", "list", "--config", str(config), cwd=tmp_path, env=fixed)
    assert listed.returncode == 0, shown(listed)
    assert listed.stdout.strip() == "no open dead letters"
