"""Guarantee 1 under fire: SIGKILL the worker at random points while a writer runs; nothing is
lost and nothing is applied twice."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from .test_ann import ann_differences
from .worker_harness import NOTES_DDL, Harness, note_mapper

ROOT = Path(__file__).resolve().parents[1]


def writer(dsn: str, stop: threading.Event, rng: random.Random, counts: dict) -> None:
    """About 20 transactions a second of mixed changes; no row is touched twice in one txn."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            ids = [r[0] for r in conn.execute("SELECT id FROM notes")]
            with conn.transaction():
                picked = set()
                for _ in range(rng.randint(1, 3)):
                    roll = rng.random()
                    candidates = [i for i in ids if i not in picked]
                    if roll < 0.4 or not candidates:
                        owner = rng.choice(["alice", "bob", "carol"])
                        title = rng.choice(["plan", "notes", "report", "boom"])
                        if title != "boom":  # exactly 'boom' makes the mapper raise
                            title = f"{title} {rng.randint(0, 999)}"
                        (new_id,) = conn.execute(
                            "INSERT INTO notes (owner, title, body) VALUES (%s, %s, %s) RETURNING id",
                            (owner, title, "body " * rng.randint(1, 30)),
                        ).fetchone()
                        picked.add(new_id)
                        counts["insert"] += 1
                        continue
                    target = rng.choice(candidates)
                    picked.add(target)
                    if roll < 0.75:
                        conn.execute("UPDATE notes SET title = %s, status = %s WHERE id = %s",
                                     (f"edited {rng.randint(0, 999)}",
                                      rng.choice(["open", "open", "hidden"]), target))
                        counts["update"] += 1
                    elif roll < 0.85:
                        conn.execute("UPDATE notes SET owner = %s WHERE id = %s",
                                     (rng.choice(["alice", "bob", "carol"]), target))
                        counts["move"] += 1
                    else:
                        conn.execute("DELETE FROM notes WHERE id = %s", (target,))
                        counts["delete"] += 1
            time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_at_random_points_loses_nothing_and_applies_nothing_twice(pg_dsn: str) -> None:
    rng = random.Random(20261123)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(NOTES_DDL)
        conn.execute("INSERT INTO notes (owner, title, body) SELECT 'alice', 'seed ' || g, 'seed body' "
                     "FROM generate_series(1, 20) g")
    harness = Harness(pg_dsn)
    harness.setup()

    stop = threading.Event()
    counts = {"insert": 0, "update": 0, "move": 0, "delete": 0}
    t = threading.Thread(target=writer, args=(pg_dsn, stop, rng, counts), daemon=True)
    t.start()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kills = 0
    try:
        while kills < 10:
            proc = subprocess.Popen([sys.executable, "-m", "tests.worker_proc", pg_dsn], cwd=ROOT, env=env)
            time.sleep(rng.uniform(0.4, 2.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    finally:
        stop.set()
        t.join()
    assert sum(counts.values()) > 100 and counts["delete"] and counts["move"]

    harness.start()
    harness.wait_caught_up(timeout=60)
    harness.stop()

    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT id, owner, title, body, status FROM notes").fetchall()
        docs = {r[0]: r for r in conn.execute(
            "SELECT object_id, partition, title, body, attrs, deleted FROM slipstream.docs "
            "WHERE object_type = 'note'")}
        log = conn.execute("SELECT seq, source_lsn::text, object_id, partition, op "
                           "FROM slipstream.changes ORDER BY seq").fetchall()
        dead = conn.execute("SELECT count(*) FROM slipstream.dead_letters").fetchone()[0]

    expected: dict[str, tuple] = {}
    for id_, owner, title, body, status in rows:
        row = {"id": id_, "owner": owner, "title": title, "body": body, "status": status}
        try:
            for doc in note_mapper(row, "update"):
                expected[doc.object_id] = (doc.partition, doc.title, doc.body, dict(doc.attrs))
        except RuntimeError:
            pass  # 'boom' titles are dead letters by design
    live = {i: (d[1], d[2], d[3], d[4]) for i, d in docs.items() if not d[5]}
    assert live == expected
    assert dead >= sum(1 for r in rows if r[2] == "boom") > 0

    assert [s for s, *_ in log] == list(range(1, len(log) + 1))  # gap-free, in order
    effects = [(lsn, oid, part, op) for _, lsn, oid, part, op in log]
    assert len(effects) == len(set(effects)), "a source change was applied twice"

    # The HNSW side table, whose indexer was killed with the workers: once the queue
    # is drained it holds exactly the live rows' vectors.
    harness.backend.drain_ann()
    assert ann_differences(pg_dsn, "local") == []
    harness.close()
