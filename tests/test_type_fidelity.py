"""One row, one document, whatever path it took: copy, stream, backfill, dead-letter retry.

Regression for the initial copy reading columns with `::text` casts: `boolean::text`
is 'true' where pgoutput sends 't', `inet::text` adds '/32', `char(n)::text` drops the
padding. Every existing row of a table with a boolean column was dead-lettered at
setup (`cannot decode 'true' as type 16`), while setup still exited 0.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import psycopg

from .cli_harness import WorkerProcess, cli, environ, query, run_sql, shown, write_config

TYPES_DDL = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE DOMAIN small_posint AS posint CHECK (VALUE < 100);
CREATE DOMAIN intlist AS int[];
CREATE TABLE public.{table} (
    id int PRIMARY KEY, owner text NOT NULL,
    flag boolean, small smallint, num int, big bigint, dec numeric(12, 4),
    re real, dbl double precision, vc varchar(40), ch char(8), txt text,
    ip inet, net cidr, mac macaddr, uid uuid, js json, jsb jsonb,
    day date, ts timestamp, tstz timestamptz, tod time, span interval, raw bytea,
    tags text[], ints int[], flags boolean[], mood mood, pos posint, cash money,
    pt point, rng int4range, huge numeric(30),
    pos2 small_posint, moods mood[], ips inet[], poss posint[], boxes box[], il intlist
);
"""
LATE_DDL = TYPES_DDL[TYPES_DDL.index("CREATE TABLE"):]  # the table only: the types exist by then

COLUMNS = ("owner, flag, small, num, big, dec, re, dbl, vc, ch, txt, ip, net, mac, uid, js, jsb, "
           "day, ts, tstz, tod, span, raw, tags, ints, flags, mood, pos, cash, pt, rng, huge, "
           "pos2, moods, ips, poss, boxes, il")
VALUES = r"""
    'user-1', true, -32768, 2147483647, -9223372036854775808, 12345.6789,
    3.14159, 2.718281828459045, 'varchar value', 'ab', E'line one\nline\ttwo \\ "quoted" ünïcode',
    '10.244.218.19', '10.1.0.0/16', '08:00:2b:01:02:03', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
    '{"b": [1, 2.50, "x"],  "a": null}', '{"b": [1, 2.50, "x"], "a": null}',
    '2026-12-02', '2026-12-02 10:11:12.345678', '2026-12-02 10:11:12.5+02', '23:59:59.5',
    '1 year 2 mons 3 days 04:05:06', '\xdeadbeef'::bytea,
    ARRAY['a,b', 'q"x', NULL, '', 'back\slash', '{brace}'], ARRAY[1, NULL, 3],
    ARRAY[true, false, NULL], 'happy', 42, 12.34, '(1.5,-2)', '[1,10)', 123456789012345678901234567890,
    7, '{sad,happy}', '{10.0.0.1,NULL,::1}', '{1,2}', '{(1,1),(0,0);(2,2),(1,1)}', '{3,NULL,4}'
"""
ALL = [c.strip() for c in COLUMNS.split(",")]


def insert(dsn: str, table: str, row_id: int) -> None:
    run_sql(dsn, f"INSERT INTO public.{table} (id, {COLUMNS}) VALUES ({row_id}, {VALUES})")


def tables_toml(*tables: str) -> str:
    return "".join(f"""
[tables."public.{t}"]
object_type = "{t}"
title = "{{vc}} {{ch}} {{flag}}"
body = "{{txt}} {{ip}} {{net}} {{mac}} {{tags}} {{ints}} {{flags}} {{mood}} {{span}} {{tstz}} {{dec}} {{re}} {{cash}} {{pt}} {{rng}}"
keywords = ["tags"]
partition = "{{owner}}"
attrs = ["flag", "mood"]
payload = {json.dumps(ALL)}

[tables."public.{t}".filter]
flag = [true]
""" for t in tables)


def documents(dsn: str, object_type: str) -> dict[str, tuple]:
    rows = query(dsn, "SELECT object_id, title, body, keywords, partition, payload, attrs "
                      "FROM slipstream.docs WHERE object_type = %s AND NOT deleted", (object_type,))
    return {r[0]: tuple(json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
                        for v in r[1:]) for r in rows}


def open_dead_letters(dsn: str) -> list[tuple]:
    return query(dsn, "SELECT relation, error FROM slipstream.dead_letters WHERE resolved_at IS NULL")


def test_copied_streamed_and_backfilled_rows_give_the_same_document(pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    run_sql(dsn, TYPES_DDL.format(table="kinds"))
    insert(dsn, "kinds", 1)  # present before setup: the initial copy reads it
    config = write_config(tmp_path / "slipstream.toml", dsn, tables_toml("kinds"))

    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    assert open_dead_letters(dsn) == []

    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        insert(dsn, "kinds", 2)  # the same row, through the stream
        worker.wait_caught_up(dsn)
    docs = documents(dsn, "kinds")
    assert set(docs) == {"1", "2"}, docs
    assert docs["1"] == docs["2"]
    title, _, _, _, payload, attrs = docs["1"]
    assert title == "varchar value ab       true"  # char(8) keeps its padding, bool is true
    payload = json.loads(payload)
    assert payload["ip"] == "10.244.218.19" and payload["flag"] is True
    assert payload["huge"] == 123456789012345678901234567890  # an integral numeric keeps every digit
    # Domains read as their base type; arrays of types the decoder does not know, as lists.
    assert (payload["pos"], payload["pos2"], payload["poss"], payload["il"]) == (42, 7, [1, 2], [3, None, 4])
    assert (payload["moods"], payload["ips"]) == (["sad", "happy"], ["10.0.0.1", None, "::1"])
    assert payload["boxes"] == "{(1,1),(0,0);(2,2),(1,1)}"  # ';'-delimited: kept as its text
    assert json.loads(attrs) == {"flag": True, "mood": "happy"}

    # A table added to the configuration later: its existing row is backfilled by `run`.
    run_sql(dsn, LATE_DDL.format(table="late"))
    insert(dsn, "late", 1)
    write_config(config, dsn, tables_toml("kinds", "late"))
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_for("backfill of public.late", lambda: "1" in documents(dsn, "late"))
        insert(dsn, "late", 2)
        worker.wait_caught_up(dsn)
    late = documents(dsn, "late")
    assert set(late) == {"1", "2"}, late
    assert late["1"] == late["2"]
    assert late["1"][1:] == docs["1"][1:] and late["1"][0] == docs["1"][0]
    assert open_dead_letters(dsn) == []


BROKEN_TOML = """
[tables."public.notes"]
python = "brokenmapper:notes"
"""
BROKEN_MAPPER = '''
import os
from slipstream.index import IndexDoc

def notes(row, op):
    if row["flag"] and not os.environ.get("MAPPER_FIXED"):
        raise ValueError(f"cannot index note {row['id']}: flagged")
    return [IndexDoc("note", str(row["id"]), title=row["title"], partition="p")]
'''


def test_setup_reports_rows_it_could_not_map_and_retry_recovers_them(
        pg_dsn: str, tmp_path: Path) -> None:
    """Setup exits non-zero naming each table's dead-lettered rows and the first error."""
    dsn = pg_dsn
    run_sql(dsn, "CREATE TABLE public.notes (id int PRIMARY KEY, title text, flag boolean)",
            "INSERT INTO notes SELECT g, 'note ' || g, g % 3 = 0 FROM generate_series(1, 10) g")
    (tmp_path / "brokenmapper.py").write_text(BROKEN_MAPPER, encoding="utf-8")
    config = write_config(tmp_path / "slipstream.toml", dsn, BROKEN_TOML)
    env_path = {"PYTHONPATH": str(tmp_path)}

    setup = cli("setup", "--config", str(config), cwd=tmp_path, env=environ(env_path))
    assert setup.returncode == 1, shown(setup)
    assert "3 rows of public.notes went to dead letters" in setup.stdout + setup.stderr, shown(setup)
    assert "cannot index note 3: flagged" in setup.stdout + setup.stderr, shown(setup)
    assert query(dsn, "SELECT count(*) FROM slipstream.docs")[0][0] == 7

    status = cli("status", "--config", str(config), "--json", cwd=tmp_path, env=environ(env_path))
    assert status.returncode == 0, shown(status)
    assert json.loads(status.stdout)["dead_letters_by_table"] == {"public.notes": 3}

    fixed = environ({**env_path, "MAPPER_FIXED": "1"})
    retry = cli("deadletter", "retry", "--config", str(config), cwd=tmp_path, env=fixed)
    assert retry.returncode == 0, shown(retry)
    assert "resolved 3" in retry.stdout, shown(retry)
    assert query(dsn, "SELECT count(*) FROM slipstream.docs WHERE NOT deleted")[0][0] == 10
    assert open_dead_letters(dsn) == []


TICKETS_DDL = """
CREATE TABLE public.tickets (
    id serial PRIMARY KEY, owner text NOT NULL, subject text NOT NULL,
    open boolean NOT NULL, client inet, prio char(4) NOT NULL
);
INSERT INTO tickets (owner, subject, open, client, prio)
    SELECT 'org-' || (g % 5), 'ticket ' || g, g % 4 <> 0, ('10.0.' || (g % 250) || '.' || (g % 200))::inet,
           CASE WHEN g % 2 = 0 THEN 'hi' ELSE 'low' END
    FROM generate_series(1, 400) g;
"""
TICKETS_TOML = """
[tables."public.tickets"]
object_type = "ticket"
title = "{subject} [{prio}]"
partition = "{owner}"
attrs = ["open"]
payload = ["client"]

[tables."public.tickets".filter]
open = [true]
"""


def ticket_writer(dsn: str, stop: threading.Event, done: list[int]) -> None:
    rng = random.Random(11)
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            target = rng.randint(1, 400 + done[0])
            roll = rng.random()
            if roll < 0.3:
                conn.execute("INSERT INTO tickets (owner, subject, open, client, prio) "
                             "VALUES (%s, %s, true, '192.168.1.7', 'mid')",
                             (f"org-{rng.randint(0, 4)}", f"new ticket {done[0]}"))
            elif roll < 0.6:
                conn.execute("UPDATE tickets SET open = NOT open WHERE id = %s", (target,))
            elif roll < 0.8:
                conn.execute("UPDATE tickets SET owner = 'org-9', subject = subject || ' moved' "
                             "WHERE id = %s", (target,))
            else:
                conn.execute("DELETE FROM tickets WHERE id = %s", (target,))
            done[0] += 1


def test_boolean_filtered_table_under_a_concurrent_writer_is_indexed_exactly(
        pg_dsn: str, tmp_path: Path) -> None:
    """Every open ticket is searchable, with the same text whether copied or streamed."""
    dsn = pg_dsn
    run_sql(dsn, TICKETS_DDL)
    config = write_config(tmp_path / "slipstream.toml", dsn, TICKETS_TOML,
                          worker={"snapshot_chunk_rows": 50})
    stop, done = threading.Event(), [0]
    writer = threading.Thread(target=ticket_writer, args=(dsn, stop, done))
    writer.start()
    try:
        setup = cli("setup", "--config", str(config), cwd=tmp_path)
        assert setup.returncode == 0, shown(setup)
        with WorkerProcess(config, cwd=tmp_path) as worker:
            worker.wait_streaming(dsn)
            while done[0] < 300:
                worker.check_alive()
                time.sleep(0.05)
            stop.set()
            writer.join()
            worker.wait_caught_up(dsn)
    finally:
        stop.set()
        writer.join()
    expected = {str(i): (owner, f"{subject} [{prio}]", {"client": client}, {"open": True})
                for i, owner, subject, prio, client in query(
                    dsn, "SELECT id, owner, subject, prio, host(client) FROM tickets WHERE open")}
    got = {r[0]: tuple(r[1:]) for r in query(
        dsn, "SELECT object_id, partition, title, payload, attrs FROM slipstream.docs "
             "WHERE object_type = 'ticket' AND NOT deleted")}
    assert open_dead_letters(dsn) == []
    assert got == expected


ODD_SETTINGS = {"DateStyle": "SQL, DMY", "TimeZone": "Asia/Kolkata", "IntervalStyle": "sql_standard",
                "bytea_output": "escape", "extra_float_digits": "0"}


def test_a_database_with_its_own_output_settings_reads_the_same(pg_dsn: str, tmp_path: Path) -> None:
    """Regression: a database set to `DateStyle = 'SQL, DMY'` (as European applications
    often are) dead-lettered every row with a date column, copied and streamed alike
    (`cannot decode '02/12/2026' as type 1082`), and `extra_float_digits = 0` cut a
    double to 15 digits. The worker's source connections now pin the output settings
    the decoder reads, so the document does not depend on the server's configuration.
    """
    dsn = pg_dsn
    (database,) = query(dsn, "SELECT current_database()")[0]
    run_sql(dsn, *(f"ALTER DATABASE {database} SET {name} = '{value}'" for name, value in ODD_SETTINGS.items()))
    run_sql(dsn, TYPES_DDL.format(table="kinds"))
    insert(dsn, "kinds", 1)
    config = write_config(tmp_path / "slipstream.toml", dsn, tables_toml("kinds"))
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        insert(dsn, "kinds", 2)
        worker.wait_caught_up(dsn)
    assert open_dead_letters(dsn) == []
    docs = documents(dsn, "kinds")
    assert set(docs) == {"1", "2"} and docs["1"] == docs["2"], docs
    payload = json.loads(docs["1"][4])
    assert payload["day"] == "2026-12-02"
    assert payload["tstz"] == "2026-12-02T08:11:12.500000+00:00"  # UTC, whatever the server's zone
    assert payload["dbl"] == 2.718281828459045  # every digit
    assert payload["span"] == "1 year 2 mons 3 days 04:05:06"
    assert payload["raw"] == "3q2+7w=="  # b'\xde\xad\xbe\xef'
