"""Device sync fed by the real worker: concurrent source writers, a device syncing mid-burst.

The worker streams from its slot while several source sessions commit interleaved
transactions (out of start order); a device syncs over HTTP during every burst. After
20 rounds the device's shard must equal the server's partition exactly (keys, text,
term counts, vectors bit for bit; tombstoned rows gone) and rank identically. A second
test follows the worker live: each commit reaches a long-polling device.
"""

from __future__ import annotations

import random
import threading
import time

import psycopg
import pytest
from slipstream.index import HashingEmbedder, SearchIndex
from slipstream.shardsync.client import SyncClient, SyncRetryPolicy
from slipstream.shardsync.server import ServerSettings
from slipstream.shardsync.shard import open_shard
from slipstream.shardsync.tokens import TokenVerifier, issue_token

from .shardsync_helpers import VOCAB
from .sync_server_helpers import RunningServer, server_state, shard_state
from .worker_harness import DIM, NOTES_DDL, Harness

SECRET = "worker-sync-secret-" + "q" * 32
OWNERS = ["alice", "bob", "carol"]


@pytest.fixture
def stack(pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(NOTES_DDL)
        conn.execute("INSERT INTO notes (owner, title, body) SELECT "
                     "(ARRAY['alice','bob','carol'])[1 + i % 3], 'note ' || i, 'apple banana ' || i "
                     "FROM generate_series(1, 30) i")
    harness = Harness(pg_dsn)
    harness.setup()
    harness.start()
    server = RunningServer(ServerSettings(dsn=pg_dsn, verifier=TokenVerifier(SECRET)))
    yield harness, server
    server.stop()
    harness.close()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def session(dsn: str, rng: random.Random, start: threading.Barrier, commit: threading.Event,
            errors: list[BaseException]) -> None:
    """One source transaction of a few writes, committed when `commit` is set."""
    try:
        with psycopg.connect(dsn) as conn:
            start.wait(timeout=10)
            for _ in range(rng.randint(1, 4)):
                op = rng.random()
                (n,) = conn.execute("SELECT max(id) FROM notes").fetchone()
                target = rng.randint(1, n or 1)
                if op < 0.35:
                    conn.execute("INSERT INTO notes (owner, title, body) VALUES (%s, %s, %s)",
                                 (rng.choice(OWNERS), words(rng, 3), words(rng, 8)))
                elif op < 0.6:
                    conn.execute("UPDATE notes SET title = %s, body = %s WHERE id = %s",
                                 (words(rng, 3), words(rng, 8), target))
                elif op < 0.8:
                    conn.execute("UPDATE notes SET owner = %s WHERE id = %s",
                                 (rng.choice(OWNERS), target))  # a move between partitions
                elif op < 0.9:
                    conn.execute("UPDATE notes SET status = %s WHERE id = %s",
                                 (rng.choice(["open", "hidden"]), target))  # filtered in/out
                else:
                    conn.execute("DELETE FROM notes WHERE id = %s", (target,))
            commit.wait(timeout=10)
            conn.commit()
    except psycopg.errors.DeadlockDetected:
        pass  # two sessions locked the same rows in opposite orders; Postgres rolled one back
    except BaseException as exc:  # surfaced by the test
        errors.append(exc)


@pytest.mark.slow
def test_a_device_syncing_mid_burst_ends_equal_to_the_server(stack, tmp_path):
    harness, server = stack
    rng = random.Random(7)
    path = tmp_path / "alice.db"
    device = SyncClient(server.url, issue_token(SECRET, ["alice"]), path, limit=4,
                        retry=SyncRetryPolicy(initial_delay=0.05, max_delay=0.2))
    device.sync()
    for _ in range(20):
        n = 3
        start, errors = threading.Barrier(n), []
        commits = [threading.Event() for _ in range(n)]
        threads = [threading.Thread(target=session, args=(harness.dsn, random.Random(rng.random()),
                                                          start, commits[i], errors))
                   for i in range(n)]
        for t in threads:
            t.start()
        order = list(range(n))
        rng.shuffle(order)  # commit out of start order
        syncer = threading.Thread(target=device.sync)
        for k, i in enumerate(order):
            commits[i].set()
            time.sleep(0.005)
            if k == 0:
                syncer.start()  # the device syncs while the burst is still committing
        for t in threads:
            t.join(timeout=30)
        syncer.join(timeout=60)
        assert not errors, errors
    harness.wait_caught_up()
    report = device.sync()
    device.close()
    assert report.pages >= 1
    expected = server_state(harness.dsn, ["alice"], ["local"])
    got = shard_state(str(path))
    assert set(got) == set(expected) and expected
    assert got == expected
    shard = open_shard(path)
    device_index = SearchIndex(shard, HashingEmbedder(DIM))
    for q in ["apple banana", "grocery list", "quarterly report meeting", "travel paris"]:
        server_hits = harness.index.search(q, partition="alice")
        device_hits = device_index.search(q, partition="alice")
        assert [(h.object_id, h.score) for h in device_hits] == \
            [(h.object_id, h.score) for h in server_hits]
    shard.close()


def test_each_commit_reaches_a_live_device_through_the_worker(stack, tmp_path):
    harness, server = stack
    path = tmp_path / "bob.db"
    device = SyncClient(server.url, issue_token(SECRET, ["bob"]), path,
                        retry=SyncRetryPolicy(initial_delay=0.05, max_delay=0.2))
    applied: list[int] = []
    follower = threading.Thread(target=device.sync, kwargs={
        "live": True, "wait": 5, "on_page": lambda n, cursor: applied.append(n)})
    follower.start()
    try:
        deadline = time.monotonic() + 20
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        for i in range(3):
            with psycopg.connect(harness.dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO notes (owner, title, body) VALUES ('bob', %s, 'live')",
                             (f"live change {i}",))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                titles = {v[1] for v in shard_state(str(path)).values()}
                if f"live change {i}" in titles:
                    break
                time.sleep(0.02)
            assert f"live change {i}" in titles
    finally:
        device.stop()
        follower.join(timeout=30)
        device.close()
    assert not follower.is_alive()
    assert shard_state(str(path)) == server_state(harness.dsn, ["bob"], ["local"])
