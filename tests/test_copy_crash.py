"""The initial copy under fire: `setup` SIGKILLed mid-copy, twice, while the application
writes; the copy resumes where it stopped and the index ends exactly equal to the table.

The first kill lands in the copy that runs inside the slot's exported snapshot, the
second in the resumed copy (current rows, each chunk stamped with the WAL position it
was read at, chunks planned while the one before commits). Rows changed during either
copy reach the index through the stream without a copied row overwriting a newer
change, and the change log stays gap-free.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from .cli_harness import WorkerProcess, cli, command, environ, query, run_sql, shown, write_config

ROWS = 12_000
TABLE = """
[tables."public.items"]
object_type = "item"
title = "{title}"
partition = "tenant-{tenant}"
attrs = ["open"]

[tables."public.items".filter]
open = [true]
"""


def writer(dsn: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """Updates (text and filter), moves, deletes and inserts over the whole key range."""
    rng = random.Random(5)
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            target = rng.randint(1, ROWS)
            roll = rng.random()
            if roll < 0.4:
                conn.execute("UPDATE items SET title = %s WHERE id = %s", (f"edited {rng.random():.6f}", target))
            elif roll < 0.6:
                conn.execute("UPDATE items SET open = NOT open WHERE id = %s", (target,))
            elif roll < 0.75:
                conn.execute("UPDATE items SET tenant = %s WHERE id = %s", (rng.randint(0, 9), target))
            elif roll < 0.85:
                conn.execute("DELETE FROM items WHERE id = %s", (target,))
            else:
                conn.execute("INSERT INTO items (tenant, title, open) VALUES (%s, %s, true)",
                             (rng.randint(0, 9), f"new {rng.random():.6f}"))
            counts["changes"] += 1
            time.sleep(0.004)


def rows_copied(dsn: str) -> int:
    try:
        rows = query(dsn, "SELECT rows_copied FROM slipstream.snapshot_progress")
    except psycopg.errors.UndefinedTable:
        return 0
    return rows[0][0] if rows else 0


def kill_setup_after(config: Path, cwd: Path, dsn: str, copied: int) -> None:
    """Start `setup`; SIGKILL it once the copy has committed at least `copied` rows."""
    proc = subprocess.Popen(command("setup", "--config", str(config)), cwd=cwd, env=environ(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while rows_copied(dsn) < copied:
            assert proc.poll() is None, f"setup exited with {proc.returncode} before it was killed"
            assert time.monotonic() < deadline, "the copy made no progress"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_setup_killed_twice_mid_copy_resumes_and_the_index_equals_the_table(
        pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    run_sql(dsn, "CREATE TABLE items (id serial PRIMARY KEY, tenant int NOT NULL, title text NOT NULL, "
                 "open boolean NOT NULL)",
            f"INSERT INTO items (tenant, title, open) SELECT g % 10, 'item ' || g, g % 4 <> 0 "
            f"FROM generate_series(1, {ROWS}) g")
    config = write_config(tmp_path / "slipstream.toml", dsn, TABLE, worker={"snapshot_chunk_rows": 500})
    stop, counts = threading.Event(), {"changes": 0}
    thread = threading.Thread(target=writer, args=(dsn, stop, counts), daemon=True)
    thread.start()
    try:
        kill_setup_after(config, tmp_path, dsn, 2_000)  # in the exported snapshot
        first = rows_copied(dsn)
        kill_setup_after(config, tmp_path, dsn, first + 3_000)  # resumed: current rows
        assert rows_copied(dsn) < ROWS, "the copy finished before the second kill"
        finished = cli("setup", "--config", str(config), cwd=tmp_path, timeout=300)
        assert finished.returncode == 0, shown(finished)
        with WorkerProcess(config, cwd=tmp_path) as worker:
            worker.wait_streaming(dsn)
            time.sleep(1.0)  # the stream carries on while the application writes
            stop.set()
            thread.join()
            worker.wait_caught_up(dsn, timeout=120)
    finally:
        stop.set()
        thread.join()
    assert counts["changes"] > 200, counts

    expected = {str(i): (f"tenant-{tenant}", title) for i, tenant, title in query(
        dsn, "SELECT id, tenant, title FROM items WHERE open")}
    live = {r[0]: (r[1], r[2]) for r in query(
        dsn, "SELECT object_id, partition, title FROM slipstream.docs WHERE NOT deleted")}
    assert live == expected
    assert query(dsn, "SELECT rows_copied >= %s, done FROM slipstream.snapshot_progress", (ROWS // 2,)) == [
        (True, True)]
    seqs = [s for (s,) in query(dsn, "SELECT seq FROM slipstream.changes ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1))  # gap-free, in order
    assert query(dsn, "SELECT count(*) FROM slipstream.dead_letters") == [(0,)]
