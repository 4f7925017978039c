"""Partitioned source tables: configured by their root, indexed whatever partition a row is in.

Regression: the publication was created without `publish_via_partition_root`, so
pgoutput sent each partition's changes under the partition's own name, which no
mapper was registered for, and `pg_publication_tables` listed the partitions instead
of the configured table, so `run` (and a second `setup`) tried to add it again and
stopped with `relation "events" is already member of publication`.
"""

from __future__ import annotations

from pathlib import Path

from .cli_harness import WorkerProcess, cli, query, run_sql, shown, write_config

DDL = """
CREATE TABLE public.events (
    id int NOT NULL, day date NOT NULL, owner text NOT NULL, title text NOT NULL,
    flag boolean NOT NULL, tags text[], score numeric(6, 2),
    PRIMARY KEY (id, day, owner)
) PARTITION BY RANGE (day);
CREATE TABLE public.events_h1 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2026-07-01');
CREATE TABLE public.events_h2 PARTITION OF events FOR VALUES FROM ('2026-07-01') TO ('2027-01-01')
    PARTITION BY LIST (owner);
CREATE TABLE public.events_h2_u1 PARTITION OF events_h2 FOR VALUES IN ('user-1');
CREATE TABLE public.events_h2_rest PARTITION OF events_h2 DEFAULT;
CREATE TABLE public.events_other PARTITION OF events DEFAULT;
"""
EXISTING = """
INSERT INTO events
SELECT g, DATE '2025-12-01' + (g * 13 % 420), 'user-' || (g % 3), 'event number ' || g,
       g % 5 <> 0, ARRAY['t' || (g % 4)], g / 7.0
FROM generate_series(1, 60) g
"""
TOML = """
[tables."public.events"]
object_type = "event"
title = "{title}"
keywords = ["tags"]
partition = "{owner}"
attrs = ["flag"]

[tables."public.events".filter]
flag = [true]
"""


def expected(dsn: str) -> dict[str, tuple[str, str]]:
    """object_id -> (partition, title) of every row the filter keeps, read from the source."""
    return {f"{i}:{day}:{owner}": (owner, title) for i, day, owner, title in query(
        dsn, "SELECT id, day::text, owner, title FROM events WHERE flag")}


def indexed(dsn: str) -> dict[str, tuple[str, str]]:
    return {r[0]: (r[1], r[2]) for r in query(
        dsn, "SELECT object_id, partition, title FROM slipstream.docs "
             "WHERE object_type = 'event' AND NOT deleted")}


def partitions_used(dsn: str) -> set[str]:
    return {r[0] for r in query(dsn, "SELECT tableoid::regclass::text FROM events")}


def test_a_partitioned_table_is_copied_and_streamed_through_its_root(pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    run_sql(dsn, DDL, EXISTING)
    assert partitions_used(dsn) == {"events_h1", "events_h2_u1", "events_h2_rest", "events_other"}
    config = write_config(tmp_path / "slipstream.toml", dsn, TOML)

    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    copied = indexed(dsn)
    assert copied == expected(dsn) and len(copied) == 48

    with WorkerProcess(config, cwd=tmp_path) as worker:  # `run` sets up again first
        worker.wait_streaming(dsn)
        run_sql(dsn,
                # one row into each leaf, through the root and directly into a partition
                "INSERT INTO events VALUES (101, '2026-02-02', 'user-1', 'spring launch', true, '{a}', 1)",
                "INSERT INTO events VALUES (102, '2026-08-08', 'user-1', 'summer launch', true, NULL, 2)",
                "INSERT INTO events_h2_rest VALUES (103, '2026-09-09', 'user-2', 'autumn launch', true, NULL, 3)",
                "INSERT INTO events VALUES (104, '2030-01-01', 'user-0', 'far future', true, NULL, 4)",
                # within a partition; across range partitions; across the list sub-partitions
                # (a move of tenant as well); filtered out; deleted
                "UPDATE events SET title = 'spring relaunch' WHERE id = 101",
                "UPDATE events SET day = '2026-10-10' WHERE id = 102",
                "UPDATE events SET owner = 'user-2' WHERE id IN (SELECT id FROM events_h2_u1 LIMIT 2)",
                "UPDATE events SET flag = false WHERE id IN (SELECT id FROM events_other WHERE flag LIMIT 1)",
                "DELETE FROM events WHERE id IN (SELECT id FROM events_h1 WHERE flag LIMIT 2)")
        worker.wait_caught_up(dsn)
        assert worker.stop()[0] == 0
    again = cli("setup", "--config", str(config), cwd=tmp_path)
    assert again.returncode == 0, shown(again)
    assert "publication: present\n" in again.stdout, shown(again)
    want = expected(dsn)
    assert indexed(dsn) == want
    assert want["101:2026-02-02:user-1"] == ("user-1", "spring relaunch")
    assert "102:2026-10-10:user-1" in want and "102:2026-08-08:user-1" not in want
    # A copied row that left (its key updated, filtered out, deleted) is a tombstone now.
    gone = {r[0] for r in query(dsn, "SELECT object_id FROM slipstream.docs WHERE deleted")}
    left = set(copied) - set(want)
    assert len(left) == 5 and left <= gone, (left, gone)


def test_an_existing_publication_is_switched_to_publish_through_roots(pg_dsn: str, tmp_path: Path) -> None:
    """A publication made without the option (by hand, or by an earlier version)."""
    dsn = pg_dsn
    run_sql(dsn, DDL, EXISTING, "CREATE PUBLICATION slipstream FOR TABLE events")
    config = write_config(tmp_path / "slipstream.toml", dsn, TOML)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    assert "set to publish partitioned tables via their root" in setup.stdout, shown(setup)
    assert query(dsn, "SELECT pubviaroot FROM pg_publication WHERE pubname = 'slipstream'") == [(True,)]
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "INSERT INTO events_h1 VALUES (201, '2026-03-03', 'user-1', 'into a partition', true, NULL, 1)")
        worker.wait_caught_up(dsn)
    assert indexed(dsn) == expected(dsn)
    assert "201:2026-03-03:user-1" in indexed(dsn)


def test_a_partition_configured_beside_its_root_is_refused_before_anything_is_made(
        pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    run_sql(dsn, DDL, EXISTING)
    leaf = TOML.replace('"public.events"', '"public.events_h2_u1"').replace('"event"', '"leaf"')
    config = write_config(tmp_path / "slipstream.toml", dsn, TOML + leaf)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 2, shown(setup)
    assert ("table 'public.events_h2_u1' is a partition of 'public.events'" in setup.stderr
            and 'remove [tables."public.events_h2_u1"]' in setup.stderr), shown(setup)
    assert query(dsn, "SELECT count(*) FROM pg_publication") == [(0,)]
    assert query(dsn, "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()") == [(0,)]
