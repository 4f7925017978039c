"""A database with its own output settings: the worker, `status` and device sync read it.

Regression: a database or role may set `DateStyle = 'SQL, DMY'` (or another
`TimeZone`, `IntervalStyle`, `extra_float_digits = 0`), and every new session then
sends values in that style. The decoder refused every source date in it (copied and
streamed rows alike went to dead letters), and psycopg cannot read a `timestamptz`
sent as text in it, so `slipstream status`, `deadletter list` and every page the sync
server read stopped with `NotImplementedError: can't parse timestamptz with DateStyle
'SQL, DMY'`. Every connection now pins the settings it reads values in.
"""

from __future__ import annotations

import json
from pathlib import Path

from slipstream.shardsync.client import sync
from slipstream.shardsync.server import ServerSettings
from slipstream.shardsync.tokens import TokenVerifier, issue_token

from .cli_harness import WorkerProcess, cli, query, run_sql, shown, write_config
from .sync_server_helpers import RunningServer, server_state, shard_state

SETTINGS = {"DateStyle": "SQL, DMY", "TimeZone": "Asia/Kolkata", "IntervalStyle": "sql_standard",
            "bytea_output": "escape", "extra_float_digits": "0"}
DDL = """
CREATE TABLE public.visits (
    id int PRIMARY KEY, owner text NOT NULL, note text NOT NULL, day date NOT NULL,
    seen timestamptz NOT NULL, took interval, score double precision, done boolean NOT NULL
);
INSERT INTO visits SELECT g, 'user-' || (g % 2), 'visit note ' || g, date '2026-12-02' + g,
    timestamptz '2026-12-02 10:11:12.5+02' + g * interval '1 hour', g * interval '90 seconds',
    g + 0.123456789012345, g % 3 = 0
    FROM generate_series(1, 6) g;
"""
TOML = """
[tables."public.visits"]
object_type = "visit"
title = "{note} on {day}"
body = "took {took}"
partition = "{owner}"
updated_at = "seen"
attrs = ["done", "day"]
payload = ["seen", "score", "took"]
"""
SECRET = "a-test-secret-of-at-least-32-bytes!!"


def test_a_database_with_other_output_settings_is_indexed_and_synced(pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    (database,) = query(dsn, "SELECT current_database()")[0]
    run_sql(dsn, *(f"ALTER DATABASE {database} SET {k} = '{v}'" for k, v in SETTINGS.items()))
    run_sql(dsn, DDL)
    config = write_config(tmp_path / "slipstream.toml", dsn, TOML)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "INSERT INTO visits VALUES (7, 'user-1', 'visit note 7', '2026-12-09', "
                     "'2026-12-02 17:11:12.5+02', '630 seconds', 7.123456789012345, false)",
                "UPDATE visits SET note = 'visit note one' WHERE id = 1")
        worker.wait_caught_up(dsn)

    status = cli("status", "--config", str(config), "--json", cwd=tmp_path)
    assert status.returncode == 0, shown(status)
    report = json.loads(status.stdout)
    assert report["dead_letters"] == 0 and report["counts"] == [{"object_type": "visit", "live": 7, "tombstones": 0}], report
    letters = cli("deadletter", "list", "--config", str(config), cwd=tmp_path)
    assert letters.returncode == 0, shown(letters)

    rows = {r[0]: r[1:] for r in query(
        dsn, "SELECT object_id, title, body, payload, attrs, source_updated_at = %s "
             "FROM slipstream.docs", ("2026-12-02T09:11:12.5+00",))}
    assert rows["1"][:4] == ("visit note one on 2026-12-03", "took 00:01:30", {
        "seen": "2026-12-02T09:11:12.500000+00:00", "score": 1.123456789012345, "took": "00:01:30"},
        {"done": False, "day": "2026-12-03"})
    assert rows["1"][4] is True  # updated_at read as the instant it is
    assert rows["7"][:2] == ("visit note 7 on 2026-12-09", "took 00:10:30")

    server = RunningServer(ServerSettings(dsn=dsn, verifier=TokenVerifier(SECRET), pool_max=2))
    shard, token = tmp_path / "user-1.db", issue_token(SECRET, ["user-1"], ttl=600)
    try:
        first = sync(server.url, token, shard)
        with WorkerProcess(config, cwd=tmp_path) as worker:
            worker.wait_streaming(dsn)
            run_sql(dsn, "UPDATE visits SET seen = seen + interval '1 day', took = NULL WHERE id = 3")
            worker.wait_caught_up(dsn)
        delta = sync(server.url, token, shard)  # a page: each entry's row read as text
    finally:
        server.stop()
    assert first.snapshot and not delta.snapshot and delta.entries == 1, (first, delta)
    state = shard_state(str(shard))
    assert sorted(k[1] for k in state) == ["1", "3", "5", "7"]
    assert state[("visit", "3", "leaf")][4]["seen"] == "2026-12-03T11:11:12.500000+00:00"
    assert state == server_state(dsn, ["user-1"], ["local"])  # the configuration's one space


TIMEOUTS = {"statement_timeout": "300ms", "lock_timeout": "10ms",
            "idle_in_transaction_session_timeout": "500ms", "transaction_timeout": "2s"}


def test_the_applications_time_limits_do_not_cut_the_initial_copy(pg_dsn: str, tmp_path: Path) -> None:
    """Regression: with `idle_in_transaction_session_timeout` set on the database (a common
    guard for an application's own sessions), `setup` died with a traceback
    (`IdleInTransactionSessionTimeout`): the initial copy reads every table in one
    exported snapshot, idle while it indexes each chunk. The worker's connections lift
    the application's time limits, as pg_dump does."""
    dsn = pg_dsn
    (database,) = query(dsn, "SELECT current_database()")[0]
    version = int(query(dsn, "SHOW server_version_num")[0][0])
    limits = {k: v for k, v in TIMEOUTS.items() if k != "transaction_timeout" or version >= 170000}
    run_sql(dsn, "CREATE TABLE notes (id int PRIMARY KEY, owner text NOT NULL, body text NOT NULL)",
            "INSERT INTO notes SELECT g, 'user-' || (g % 3), repeat('word' || g || ' ', 30) "
            "FROM generate_series(1, 6000) g")
    run_sql(dsn, *(f"ALTER DATABASE {database} SET {k} = '{v}'" for k, v in limits.items()))
    config = write_config(tmp_path / "slipstream.toml", dsn, """
[tables."public.notes"]
object_type = "note"
title = "note {id}"
body = "{body}"
partition = "{owner}"
""", worker={"snapshot_chunk_rows": 2000})
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    assert query(dsn, "SELECT count(*) FROM slipstream.docs WHERE NOT deleted") == [(6000,)]
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "UPDATE notes SET body = 'changed' WHERE id <= 3000")
        worker.wait_caught_up(dsn)
    assert query(dsn, "SELECT count(*) FROM slipstream.docs WHERE body = 'changed'") == [(3000,)]
    assert query(dsn, "SELECT count(*) FROM slipstream.dead_letters") == [(0,)]


def test_connections_notice_a_silent_loss_within_a_minute_unless_the_dsn_says_otherwise(pg_dsn: str) -> None:
    """Without them, a connection a NAT dropped while idle hung its next statement for the
    operating system's quarter of an hour (unacknowledged data) or two hours (keepalives)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict
    from slipstream.index.pg_connect import pinned_conninfo

    with psycopg.connect(pinned_conninfo(pg_dsn)) as conn:  # libpq takes them, on a real server
        used = conninfo_to_dict(conn.info.dsn)
    assert {k: used.get(k) for k in ("keepalives_idle", "keepalives_interval", "keepalives_count",
                                     "tcp_user_timeout")} == {
        "keepalives_idle": "30", "keepalives_interval": "10", "keepalives_count": "3",
        "tcp_user_timeout": "60000"}
    own = conninfo_to_dict(pinned_conninfo("host=db dbname=app keepalives_idle=5 tcp_user_timeout=0"))
    assert own["keepalives_idle"] == "5" and own["tcp_user_timeout"] == "0"
    assert own["keepalives_count"] == "3" and own["client_encoding"] == "UTF8"
