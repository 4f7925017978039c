"""The search tables in a database of their own (`[search] dsn`), apart from the source.

The copy reads the source in its exported snapshot and writes the search database;
the stream's apply commits the documents, the change log and the checkpoint there,
in one transaction, and confirms the slot on the source only after it. A worker
killed mid-stream resumes exactly once; `status` reads both databases; devices sync
from the search database.
"""

from __future__ import annotations

import json
from pathlib import Path

from slipstream.shardsync.client import sync
from slipstream.shardsync.server import ServerSettings
from slipstream.shardsync.tokens import TokenVerifier, issue_token

from .cli_harness import WorkerProcess, cli, query, run_sql, shown, toml_string, write_config
from .sync_server_helpers import RunningServer, server_state, shard_state

DDL = """
CREATE TABLE public.tasks (
    id int PRIMARY KEY, owner text NOT NULL, title text NOT NULL, done boolean NOT NULL,
    due timestamptz, tags text[]
);
INSERT INTO tasks SELECT g, 'user-' || (g % 3), 'task number ' || g, g % 4 = 0,
    timestamptz '2026-12-01 09:00+00' + g * interval '1 day', ARRAY['t' || (g % 5)]
    FROM generate_series(1, 300) g;
"""
TOML = """
[tables."public.tasks"]
object_type = "task"
title = "{title}"
keywords = ["tags"]
partition = "{owner}"
attrs = ["done"]
payload = ["due"]
"""
SECRET = "a-test-secret-of-at-least-32-bytes!!"


def expected(source: str) -> dict[str, tuple]:
    return {str(i): (owner, title, {"done": done}) for i, owner, title, done in query(
        source, "SELECT id, owner, title, done FROM tasks")}


def indexed(search: str) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in query(
        search, "SELECT object_id, partition, title, attrs FROM slipstream.docs WHERE NOT deleted")}


def test_a_search_database_apart_from_the_source(pg_dsn: str, other_dsn: str, tmp_path: Path) -> None:
    source, search = pg_dsn, other_dsn
    run_sql(source, DDL)
    config = write_config(tmp_path / "slipstream.toml", source, TOML,
                          extra=f"\n[search]\ndsn = {toml_string(search)}\n")
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    assert query(source, "SELECT count(*) FROM pg_namespace WHERE nspname = 'slipstream'") == [(0,)]
    assert indexed(search) == expected(source)

    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(source)
        run_sql(source, "UPDATE tasks SET done = NOT done WHERE id % 7 = 0",
                "DELETE FROM tasks WHERE id % 11 = 0",
                "INSERT INTO tasks SELECT g, 'user-1', 'late task ' || g, false, NULL, NULL "
                "FROM generate_series(301, 340) g")
        worker.wait_caught_up(source)
        (before,) = query(search, "SELECT max(seq) FROM slipstream.changes")[0]
        # 60 more transactions; SIGKILL once some are applied: the next run resumes from
        # the search database's checkpoint and applies each exactly once.
        run_sql(source, *(f"UPDATE tasks SET title = 'burst {i}', done = true WHERE id = {i}"
                          for i in range(1, 61)))
        worker.wait_for("part of the burst", lambda: query(
            search, "SELECT count(*) FROM slipstream.docs WHERE title LIKE 'burst %'")[0][0] >= 5)
        worker.kill()
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(source)
        worker.wait_caught_up(source)
        updated = 60 - len([i for i in range(1, 61) if i % 11 == 0])  # those rows were deleted
        assert query(search, "SELECT count(*), count(DISTINCT object_id) FROM slipstream.changes "
                             "WHERE seq > %s", (before,)) == [(updated, updated)]
        run_sql(source, "UPDATE tasks SET title = title || ' (edited)' WHERE id % 5 = 0",
                "UPDATE tasks SET owner = 'user-9' WHERE id BETWEEN 20 AND 25")
        worker.wait_caught_up(source)
    assert indexed(search) == expected(source)
    assert query(search, "SELECT count(*) FROM slipstream.dead_letters") == [(0,)]
    # The change log is gap-free and holds one entry per effect, in commit order.
    seqs = [r[0] for r in query(search, "SELECT seq FROM slipstream.changes ORDER BY seq")]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

    status = cli("status", "--config", str(config), "--json", cwd=tmp_path)
    assert status.returncode == 0, shown(status)
    report = json.loads(status.stdout)
    assert report["slot"]["name"] == "slipstream" and report["counts"][0]["live"] == len(expected(source))

    server = RunningServer(ServerSettings(dsn=search, verifier=TokenVerifier(SECRET), pool_max=2))
    try:
        shard = tmp_path / "user-1.db"
        sync(server.url, issue_token(SECRET, ["user-1"], ttl=600), shard)
    finally:
        server.stop()
    assert shard_state(str(shard)) == server_state(search, ["user-1"], ["local"])
    assert len(shard_state(str(shard))) == sum(1 for v in expected(source).values() if v[0] == "user-1")
