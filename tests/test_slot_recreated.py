"""A search schema outlives its slot: the slot dropped by hand (or by `teardown
--keep-index`) while the worker is stopped, then `setup` makes a new one.

Regression: nothing recorded the changes made while no slot existed, and the new
slot's setup copied nothing (every table's copy was marked done), so inserts, updates
and deletes of that time never reached the index, with nothing said. Now each table
copied before is copied again in the new slot's snapshot, and rows stored before the
new slot and not read again are tombstoned — also when that copy is killed and resumed
by `run` beside the live stream.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from .cli_harness import SLOT, WorkerProcess, cli, command, environ, query, run_sql, shown, write_config

TABLE = """
[tables."public.items"]
object_type = "item"
title = "{title}"
partition = "tenant-{tenant}"

[tables."public.items".filter]
open = [true]
"""


def index_equals_table(dsn: str) -> None:
    expected = {str(i): (f"tenant-{tenant}", title) for i, tenant, title in query(
        dsn, "SELECT id, tenant, title FROM items WHERE open")}
    live = {r[0]: (r[1], r[2]) for r in query(
        dsn, "SELECT object_id, partition, title FROM slipstream.docs WHERE NOT deleted")}
    assert live == expected


def gap_changes(dsn: str) -> None:
    """What the application does while no slot records it."""
    run_sql(dsn, "UPDATE items SET title = 'edited in the gap' WHERE id % 97 = 0",
            "DELETE FROM items WHERE id % 89 = 0",
            "UPDATE items SET open = false WHERE id % 83 = 0",
            "UPDATE items SET tenant = tenant + 1 WHERE id % 79 = 0",
            "INSERT INTO items (tenant, title, open) SELECT 1, 'new in the gap ' || g, true "
            "FROM generate_series(1, 25) g")


def resync_progress(dsn: str) -> tuple[int, bool]:
    (copied, resync), = query(dsn, "SELECT rows_copied, resync_lsn IS NOT NULL FROM slipstream.snapshot_progress")
    return copied, resync


def kill_resync_after(config: Path, cwd: Path, dsn: str, copied: int) -> None:
    """Start `setup`; SIGKILL it once the copy again has committed at least `copied` rows."""
    proc = subprocess.Popen(command("setup", "--config", str(config)), cwd=cwd, env=environ(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (resync_progress(dsn)[1] and resync_progress(dsn)[0] >= copied):
            assert proc.poll() is None, f"setup exited with {proc.returncode} before it was killed"
            assert time.monotonic() < deadline, "the copy made no progress"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def make_items(dsn: str, rows: int) -> None:
    run_sql(dsn, "CREATE TABLE items (id serial PRIMARY KEY, tenant int NOT NULL, title text NOT NULL, "
                 "open boolean NOT NULL)",
            f"INSERT INTO items (tenant, title, open) SELECT g % 10, 'item ' || g, true "
            f"FROM generate_series(1, {rows}) g")


def test_a_slot_made_anew_copies_again_and_tombstones_rows_deleted_meanwhile(
        pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    make_items(dsn, 1_000)
    config = write_config(tmp_path / "slipstream.toml", dsn, TABLE)
    assert cli("setup", "--config", str(config), cwd=tmp_path).returncode == 0
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "UPDATE items SET title = 'streamed' WHERE id = 1")
        worker.wait_caught_up(dsn)
    (logged,) = query(dsn, "SELECT count(*) FROM slipstream.changes")[0]

    run_sql(dsn, f"SELECT pg_drop_replication_slot('{SLOT}')")
    gap_changes(dsn)
    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 0, shown(setup)
    assert "slot: created" in setup.stdout
    assert "public.items: its changes went unrecorded for a while" in setup.stdout, shown(setup)
    index_equals_table(dsn)
    tombstoned = {r[0] for r in query(dsn, "SELECT object_id FROM slipstream.docs WHERE deleted")}
    assert tombstoned == {str(i) for i in range(1, 1_001) if i % 89 == 0 or (i % 83 == 0 and i % 89)}
    # Only what changed is written and logged: rows the gap left alone are not. (No id
    # up to 1,000 is in two of the sets; a move logs its old partition's tombstone too.)
    edits, deletes, closed, moves = (len(range(p, 1_001, p)) for p in (97, 89, 83, 79))
    (now,) = query(dsn, "SELECT count(*) FROM slipstream.changes")[0]
    assert now - logged == edits + deletes + closed + 2 * moves + 25
    assert query(dsn, "SELECT count(*) FROM slipstream.snapshot_progress WHERE resync_lsn IS NOT NULL "
                      "OR NOT done") == [(0,)]

    with WorkerProcess(config, cwd=tmp_path) as worker:  # and the new slot streams
        worker.wait_streaming(dsn)
        run_sql(dsn, "DELETE FROM items WHERE id = 2", "UPDATE items SET title = 'after' WHERE id = 3")
        worker.wait_caught_up(dsn)
    index_equals_table(dsn)


@pytest.mark.slow
def test_a_resync_killed_mid_copy_finishes_beside_the_stream(pg_dsn: str, tmp_path: Path) -> None:
    """The copy in the new slot's snapshot is killed; `run` resumes it between stream
    batches while the application writes, and still tombstones what the gap deleted."""
    dsn = pg_dsn
    rows = 6_000
    make_items(dsn, rows)
    config = write_config(tmp_path / "slipstream.toml", dsn, TABLE, worker={"snapshot_chunk_rows": 250})
    assert cli("setup", "--config", str(config), cwd=tmp_path, timeout=300).returncode == 0
    run_sql(dsn, f"SELECT pg_drop_replication_slot('{SLOT}')")
    gap_changes(dsn)

    kill_resync_after(config, tmp_path, dsn, 1_000)  # in the new slot's exported snapshot
    copied, resync = resync_progress(dsn)
    assert 1_000 <= copied < rows and resync
    assert query(dsn, "SELECT done FROM slipstream.snapshot_progress") == [(False,)]

    stop = threading.Event()

    def write() -> None:  # deletes, edits and inserts over the whole key range
        with psycopg.connect(dsn, autocommit=True) as conn:
            n = 0
            while not stop.is_set():
                n += 1
                target = (n * 7919) % rows + 1
                if n % 3 == 0:
                    conn.execute("DELETE FROM items WHERE id = %s", (target,))
                elif n % 3 == 1:
                    conn.execute("UPDATE items SET title = %s WHERE id = %s", (f"live {n}", target))
                else:
                    conn.execute("INSERT INTO items (tenant, title, open) VALUES (2, %s, true)", (f"live new {n}",))
                time.sleep(0.005)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        with WorkerProcess(config, cwd=tmp_path) as worker:
            worker.wait_for("the resumed copy", lambda: query(
                dsn, "SELECT done FROM slipstream.snapshot_progress") == [(True,)], timeout=120)
            stop.set()
            thread.join()
            worker.wait_caught_up(dsn, timeout=60)
    finally:
        stop.set()
        thread.join()
    index_equals_table(dsn)
    assert query(dsn, "SELECT resync_lsn FROM slipstream.snapshot_progress") == [(None,)]
    seqs = [s for (s,) in query(dsn, "SELECT seq FROM slipstream.changes ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1))


@pytest.mark.parametrize("how", ["table", "publication"])
def test_a_table_taken_out_of_the_publication_is_put_back_and_caught_up(
        pg_dsn: str, tmp_path: Path, how: str) -> None:
    """Regression: changes of a table taken out of the publication by hand (or of every
    table, the publication dropped) were never sent, and the running worker, and every
    later setup, left the index as it was. The worker notices it between batches, puts
    the table back and copies it again, tombstoning what was deleted meanwhile."""
    dsn = pg_dsn
    make_items(dsn, 500)
    config = write_config(tmp_path / "slipstream.toml", dsn, TABLE, worker={"metrics_interval_seconds": 0.5})
    assert cli("setup", "--config", str(config), cwd=tmp_path).returncode == 0
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "ALTER PUBLICATION slipstream DROP TABLE items" if how == "table"
                else "DROP PUBLICATION slipstream")
        gap_changes(dsn)
        worker.wait_for("the table back in the publication", lambda: query(
            dsn, "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'slipstream' "
                 "AND tablename = 'items'") == [(1,)])
        worker.wait_for("the catch-up copy", lambda: query(
            dsn, "SELECT done, resync_lsn IS NULL FROM slipstream.snapshot_progress") == [(True, True)])
        run_sql(dsn, "UPDATE items SET title = 'streamed again' WHERE id = 5")
        worker.wait_caught_up(dsn)
    index_equals_table(dsn)
