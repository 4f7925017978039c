"""A table added to the configuration later: its existing rows are copied, its changes streamed,
and the tables already indexed are left alone — all through the `slipstream` command."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import psycopg

from .cli_harness import WorkerProcess, live_docs, query, run_sql, write_config

TABLES_DDL = """
CREATE TABLE public.items (id serial PRIMARY KEY, owner text NOT NULL, title text, body text);
CREATE TABLE public.notes (id serial PRIMARY KEY, owner text NOT NULL, title text, body text);
INSERT INTO items (owner, title, body)
    SELECT 'user-' || (g % 3), 'item ' || g, 'item body ' || g FROM generate_series(1, 50) g;
INSERT INTO notes (owner, title, body)
    SELECT 'user-' || (g % 4), 'note ' || g, 'note body ' || g FROM generate_series(1, 300) g;
"""

ITEMS_TOML = """
[tables."public.items"]
object_type = "item"
title = "{title}"
body = "{body}"
partition = "{owner}"
"""

NOTES_TOML = """
[tables."public.notes"]
object_type = "note"
title = "{title}"
body = "{body}"
partition = "{owner}"
"""


def expected(dsn: str, table: str) -> dict[str, tuple[str, str, str]]:
    return {str(i): (owner, title or "", body or "") for i, owner, title, body in query(
        dsn, f"SELECT id, owner, title, body FROM {table}")}


def writer(dsn: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """New rows in both tables, and edits, moves and deletes of the old notes being copied."""
    rng = random.Random(7)
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            n = sum(counts.values())
            conn.execute("INSERT INTO items (owner, title, body) VALUES (%s, %s, 'streamed')",
                         (f"user-{n % 3}", f"new item {n}"))
            conn.execute("INSERT INTO notes (owner, title, body) VALUES (%s, %s, 'streamed')",
                         (f"user-{n % 4}", f"new note {n}"))
            target = rng.randint(1, 300)
            roll = rng.random()
            if roll < 0.6:
                conn.execute("UPDATE notes SET title = %s WHERE id = %s", (f"edited {n}", target))
            elif roll < 0.8:
                conn.execute("UPDATE notes SET owner = 'user-9' WHERE id = %s", (target,))
            else:
                conn.execute("DELETE FROM notes WHERE id = %s", (target,))
            counts["txns"] += 3
            time.sleep(0.005)


def test_table_added_later_is_backfilled_while_both_tables_stream(
        pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    run_sql(dsn, TABLES_DDL)
    config = tmp_path / "slipstream.toml"
    settings = {"snapshot_chunk_rows": 40}

    write_config(config, dsn, ITEMS_TOML, worker=settings)
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "INSERT INTO items (owner, title, body) VALUES ('user-1', 'item 51', 'late')")
        worker.wait_caught_up(dsn)
        assert live_docs(dsn, "item") == expected(dsn, "items")
        assert live_docs(dsn, "note") == {}
        code, _ = worker.stop()
        assert code == 0, worker.output()
    items_log = query(dsn, "SELECT object_id, op FROM slipstream.changes "
                           "WHERE object_type = 'item' ORDER BY seq")
    assert sorted(int(i) for i, _ in items_log) == list(range(1, 52))
    items_progress = query(dsn, "SELECT rows_copied, done FROM slipstream.snapshot_progress "
                                "WHERE relation = 'public.items'")
    assert items_progress == [(50, True)]

    write_config(config, dsn, ITEMS_TOML + NOTES_TOML, worker=settings)
    stop, counts = threading.Event(), {"txns": 0}
    thread = threading.Thread(target=writer, args=(dsn, stop, counts), daemon=True)
    thread.start()
    try:
        with WorkerProcess(config, cwd=tmp_path) as worker:
            worker.wait_streaming(dsn)
            time.sleep(1.0)  # both tables keep changing while the worker streams
            stop.set()
            thread.join()
            worker.wait_caught_up(dsn)
            code, _ = worker.stop()
            assert code == 0, worker.output()
    finally:
        stop.set()
        thread.join()
    assert counts["txns"] > 30

    setup_done = [e for e in worker.events() if e["event"] == "setup_done"]
    assert setup_done and setup_done[0]["added_tables"] == ["public.notes"]
    # Nothing is copied before streaming: notes is backfilled between stream batches,
    # and items is not copied again.
    assert not setup_done[0]["copied"] and setup_done[0]["backfill"] == ["public.notes"]
    events = [e["event"] for e in worker.events()]
    assert events.index("streaming") < events.index("backfill_done")

    assert live_docs(dsn, "item") == expected(dsn, "items")
    assert live_docs(dsn, "note") == expected(dsn, "notes")
    assert query(dsn, "SELECT count(*) FROM slipstream.docs WHERE object_type NOT IN "
                      "('item', 'note')") == [(0,)]
    assert query(dsn, "SELECT relation, done FROM slipstream.snapshot_progress ORDER BY 1") == [
        ("public.items", True), ("public.notes", True)]
    assert query(dsn, "SELECT rows_copied, done FROM slipstream.snapshot_progress "
                      "WHERE relation = 'public.items'") == items_progress
    # The items indexed before the restart got no second entry in the change log.
    later = query(dsn, "SELECT object_id FROM slipstream.changes WHERE object_type = 'item' "
                       "AND seq > %s", (len(items_log),))
    assert not {i for (i,) in later} & {i for i, _ in items_log}
    assert query(dsn, "SELECT count(*) FROM slipstream.dead_letters") == [(0,)]
    seqs = [s for (s,) in query(dsn, "SELECT seq FROM slipstream.changes ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1))
