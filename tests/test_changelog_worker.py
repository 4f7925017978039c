"""End to end through the real worker: source sessions commit interleaved while devices
sync mid-burst; each device's shard ends equal to the server's partition and ranks
identically, moves and deletes included."""

from __future__ import annotations

import random
import threading

import psycopg
from slipstream.index import HashingEmbedder, SearchIndex
from slipstream.shardsync.export import export_shard
from slipstream.shardsync.reader import changes_since
from slipstream.shardsync.shard import apply_page, open_shard, shard_cursor

from .shardsync_helpers import pull, server_rows, shard_rows, summary
from .worker_harness import DIM, NOTES_DDL, Harness

OWNERS = ["alice", "bob", "carol"]
WORDS = ["apple", "banana", "quarterly", "report", "paris", "flight", "invoice", "refund"]


def burst(dsn: str, rng: random.Random, sessions: int = 3, statements: int = 6) -> None:
    """`sessions` transactions open at once, statements interleaved, committed out of order.
    One thread drives them all, so a statement never waits on another session's row lock
    (SKIP LOCKED): that wait could never end."""
    conns = [psycopg.connect(dsn) for _ in range(sessions)]
    try:
        for _ in range(statements):
            for conn in conns:
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))
                kind = rng.random()
                if kind < 0.45:
                    conn.execute("INSERT INTO notes (owner, title, body) VALUES (%s, %s, %s)",
                                 (rng.choice(OWNERS), text, text + " body"))
                elif kind < 0.7:
                    conn.execute("UPDATE notes SET title = %s WHERE id = (SELECT id FROM notes "
                                 "ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED)", (text,))
                elif kind < 0.85:  # a move to another partition
                    conn.execute("UPDATE notes SET owner = %s WHERE id = (SELECT id FROM notes "
                                 "ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED)", (rng.choice(OWNERS),))
                elif kind < 0.93:
                    conn.execute("DELETE FROM notes WHERE id = (SELECT id FROM notes "
                                 "ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED)")
                else:  # the mapper filters hidden rows out: a tombstone for devices
                    conn.execute("UPDATE notes SET status = 'hidden' WHERE id = (SELECT id FROM "
                                 "notes ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED)")
        for conn in rng.sample(conns, len(conns)):
            conn.commit()
    finally:
        for conn in conns:
            conn.close()


def sync(shard, conn, partition: str) -> None:
    pull(shard, conn, [partition], limit=4)


def test_devices_follow_the_worker_through_interleaved_commits(pg_dsn: str, tmp_path) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(NOTES_DDL)
        conn.execute("INSERT INTO notes (owner, title, body) SELECT (ARRAY['alice','bob','carol'])"
                     "[1 + i % 3], 'apple report ' || i, 'paris flight ' || i FROM generate_series(1, 30) i")
    harness = Harness(pg_dsn)
    rng = random.Random(11)
    try:
        harness.setup()
        harness.start()
        harness.wait_caught_up()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            shards = {}
            for owner in ("alice", "bob"):
                export_shard(conn, "slipstream", [owner], tmp_path / f"{owner}.db", ["local"])
                shards[owner] = open_shard(tmp_path / f"{owner}.db")
            for _ in range(10):
                writer = threading.Thread(target=burst, args=(pg_dsn, rng))
                writer.start()
                for owner, shard in shards.items():  # mid-burst
                    sync(shard, conn, owner)
                writer.join()
            harness.wait_caught_up()
            for owner, shard in shards.items():
                sync(shard, conn, owner)
                assert shard_rows(shard) == server_rows(pg_dsn, [owner], ["local"])
                device = SearchIndex(shard, HashingEmbedder(DIM))
                for text in ("apple report", "paris", "quarterly refund", "banana flight"):
                    assert summary(harness.index.search(text, partition=owner)) == \
                        summary(device.search(text, partition=owner))
            (moves,) = conn.execute(
                "SELECT count(*) FROM slipstream.changes c JOIN slipstream.docs d USING "
                "(object_type, object_id, node_kind) WHERE c.op = 'd' AND NOT d.deleted").fetchone()
            assert moves > 0  # the history did move live rows between partitions
    finally:
        harness.close()
