"""The stream runner's loop on a real database: it sleeps while it waits, chores run under
load, stop wakes it at once, and the reconnect backoff starts over after a healthy run."""

from __future__ import annotations

import dataclasses
import threading
import time

import psycopg
import pytest
from slipstream.index import HashingEmbedder
from slipstream.shardsync.changelog import ChangeLog
from slipstream.worker.errors import ReplicationConnectionError, RetryPolicy, SlotNotFoundError
from slipstream.worker.runner import RunnerSettings, StreamRunner

from .cli_harness import query, run_sql
from .worker_harness import DIM, NOTES_DDL, Harness, note_mapper


@pytest.fixture
def harness(pg_dsn: str):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(NOTES_DDL)
    h = Harness(pg_dsn)
    h.setup()
    yield h
    h.close()


def slow_mapper(row, op):
    """A mapper that waits on something outside Python (as an HTTP embedder or a lookup
    would): it keeps the pipeline busy without holding the GIL."""
    time.sleep(0.004)
    return note_mapper(row, op)


@pytest.fixture
def slow_harness(pg_dsn: str):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(NOTES_DDL)
    h = Harness(pg_dsn, {"public.notes": slow_mapper})
    h.setup()
    yield h
    h.close()


class ReaderThread:
    """Runs a StreamRunner in a thread and measures that thread's own CPU time."""

    def __init__(self, runner: StreamRunner) -> None:
        self.runner = runner
        self.cpu = 0.0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert runner.ready.wait(30), "the runner did not start streaming"

    def _run(self) -> None:
        started = time.thread_time()
        try:
            self.runner.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised by stop()
            self.error = exc
        finally:
            self.cpu = time.thread_time() - started

    def stop(self) -> None:
        self.runner.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the runner did not stop"
        if self.error is not None:
            raise self.error


def steady_writer(dsn: str, rate: float, seconds: float) -> int:
    """Single-row transactions at `rate` per second for `seconds`; returns how many."""
    n = int(rate * seconds)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = on")  # each commit reaches the walsender at once
        started = time.perf_counter()
        for i in range(n):
            conn.execute("INSERT INTO notes (owner, title, body) VALUES (%s, %s, %s)",
                         (f"user-{i % 7}", f"note {i}", "steady stream body text"))
            delay = started + (i + 1) / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    return n


def test_reader_sleeps_while_the_pipeline_is_busy(slow_harness: Harness) -> None:
    """Regression: once a batch was due and the pipeline had not taken it, the loop polled
    the replication socket with a zero timeout until the committer finished — millions of
    polls a second, a core burnt, and the GIL taken from the planner and committer. The
    reader must sleep on the socket and the pipeline together instead."""
    harness = slow_harness
    applying = [0.0]  # CPU the reader thread spent applying small batches itself (not reading)

    def make_applier():  # called on the reader thread
        applier, reading_thread = harness.applier(), threading.current_thread()
        def timed(fn):
            def wrapper(*args, **kw):
                if threading.current_thread() is not reading_thread:
                    return fn(*args, **kw)
                started = time.thread_time()
                try:
                    return fn(*args, **kw)
                finally:
                    applying[0] += time.thread_time() - started
            return wrapper

        applier.plan, applier.commit = timed(applier.plan), timed(applier.commit)
        return applier

    runner = StreamRunner(harness.settings, make_applier, tables=set(harness.mappers))
    reader = ReaderThread(runner)
    try:
        sent = steady_writer(harness.dsn, rate=200, seconds=3.0)
        harness.runner = runner
        harness.wait_caught_up()
    finally:
        harness.runner = None
        reader.stop()
    with psycopg.connect(harness.dsn) as conn:
        (applied,) = conn.execute("SELECT count(*) FROM slipstream.docs WHERE NOT deleted").fetchone()
    assert applied == sent
    # Decoding a single-row transaction costs well under a millisecond of the reader's CPU;
    # a spinning reader burns the whole time the pipeline is busy.
    reading = reader.cpu - applying[0]
    assert reading < 1.5e-3 * sent, f"reader used {reading:.2f} s of CPU for {sent} txns"
    # Each transaction wakes the reader a few times (its data, its commit, a keepalive);
    # a spinning reader wakes hundreds of thousands of times.
    assert runner.waits < 20 * sent, f"{runner.waits} waits for {sent} transactions"


def test_idle_reader_sleeps(harness: Harness) -> None:
    runner = StreamRunner(harness.settings, harness.applier, tables=set(harness.mappers))
    reader = ReaderThread(runner)
    waits = runner.waits
    time.sleep(2.0)
    idle_waits = runner.waits - waits
    reader.stop()
    # status_interval is 1 s in the harness: a handful of wake-ups, not thousands
    assert idle_waits < 20, f"{idle_waits} wake-ups in 2 s of idleness"


def test_stop_wakes_a_sleeping_reader_at_once(harness: Harness) -> None:
    settings = dataclasses.replace(harness.settings, status_interval=60.0, pending_interval=60.0)
    runner = StreamRunner(settings, harness.applier, tables=set(harness.mappers))
    reader = ReaderThread(runner)
    time.sleep(0.3)  # asleep in poll(), with nothing due for a minute
    asked = time.monotonic()
    reader.stop()
    assert time.monotonic() - asked < 2.0  # not at the next status update, 30 s away


class Flaky(HashingEmbedder):
    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.down = True

    def embed(self, texts):
        if self.down:
            raise ConnectionError("embedding service unavailable")
        return super().embed(texts)


def pending_count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM slipstream.docs "
                            "WHERE pending_spaces <> '{}' AND NOT deleted").fetchone()[0]


def test_pending_embeddings_are_filled_while_the_stream_is_busy(harness: Harness) -> None:
    flaky = Flaky(DIM)
    harness.index.embedders["local"] = flaky
    settings = dataclasses.replace(harness.settings, pending_interval=0.2, chore_every=4)
    runner = StreamRunner(settings, harness.applier, tables=set(harness.mappers))
    reader = ReaderThread(runner)
    try:
        steady_writer(harness.dsn, rate=100, seconds=0.5)
        harness.runner = runner
        harness.wait_caught_up()
        assert pending_count(harness.dsn) == 50
        flaky.down = False
        writer = threading.Thread(target=steady_writer, args=(harness.dsn, 150, 4.0), daemon=True)
        writer.start()
        deadline = time.monotonic() + 30
        while pending_count(harness.dsn) and time.monotonic() < deadline:
            time.sleep(0.05)
        filled_while_writing = writer.is_alive()
        writer.join()
        harness.wait_caught_up()
    finally:
        harness.runner = None
        reader.stop()
    assert pending_count(harness.dsn) == 0
    assert filled_while_writing
    with psycopg.connect(harness.dsn) as conn:
        seqs = [r[0] for r in conn.execute("SELECT seq FROM slipstream.changes ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1))  # the fill pass logged in the single-writer order


def test_backoff_starts_over_after_a_connection_held() -> None:
    """Regression: `attempt` only ever grew, so a worker that had reconnected a few times
    over days waited the maximum delay after every later blip."""
    policy = RetryPolicy(initial_delay=0.01, max_delay=10.0, multiplier=2.0, healthy_after=0.2)
    runner = StreamRunner(RunnerSettings("dbname=x", "s", "p"), lambda: None, retry=policy,
                          log=lambda event, **kw: attempts.append(kw["attempt"]))
    attempts: list[int] = []
    script = iter([0.0, 0.0, 0.0, 0.3, 0.0, 0.0])  # seconds each connection streams

    def run_once() -> None:
        held = next(script, None)
        if held is None:
            raise SlotNotFoundError("slot gone")  # the policy says stop: ends the test
        runner._streaming_since = time.monotonic()
        time.sleep(held)
        raise ReplicationConnectionError("connection lost")

    runner._run_once = run_once  # type: ignore[method-assign]
    with pytest.raises(SlotNotFoundError):
        runner.run()
    assert attempts == [0, 1, 2, 0, 1, 2]


def test_retry_policy_decides_every_failure() -> None:
    """Errors the loop used to re-wrap by hand are in the one decision table now."""
    policy = RetryPolicy()
    assert policy.decide(psycopg.OperationalError("server closed the connection"), 0).action == "retry"
    assert policy.decide(ConnectionResetError(), 0).action == "retry"
    assert policy.decide(SlotNotFoundError("gone"), 0).action == "stop"
    assert policy.decide(ValueError("bug"), 0).action == "stop"
    assert policy.attempt_after(5, held=policy.healthy_after) == 0
    assert policy.attempt_after(5, held=policy.healthy_after - 1) == 5


def test_the_worker_compacts_the_change_log_on_its_interval(pg_dsn: str) -> None:
    """With an interval set, the running worker drops superseded entries and purged
    tombstones between batches, and raises the horizon; devices resync past it."""
    run_sql(pg_dsn, NOTES_DDL)
    harness = Harness(pg_dsn)
    harness.settings = dataclasses.replace(harness.settings, compact_interval=0.3,
                                           tombstone_retention=0.0)
    harness.setup()
    harness.start()
    try:
        run_sql(pg_dsn, "INSERT INTO notes (owner, title) SELECT 'u', 'n' || g FROM generate_series(1, 20) g")
        run_sql(pg_dsn, "UPDATE notes SET title = title || ' edited'")
        run_sql(pg_dsn, "DELETE FROM notes WHERE id <= 5")
        harness.wait_caught_up()
        log = ChangeLog("slipstream")

        def horizon() -> int:
            with psycopg.connect(pg_dsn) as conn:
                return log.horizon(conn)
        deadline = time.monotonic() + 30
        while horizon() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert horizon() > 0, harness.events[-5:]
        assert any(e == "change_log_compacted" for e, _ in harness.events)
        # One entry per key is left: the 15 live rows' last upserts; the deletes are purged.
        rows = query(pg_dsn, "SELECT object_id, op FROM slipstream.changes ORDER BY seq")
        assert sorted(int(i) for i, _ in rows) == list(range(6, 21))
        assert {op for _, op in rows} == {"u"}
        assert query(pg_dsn, "SELECT count(*) FROM slipstream.docs WHERE deleted") == [(0,)]
    finally:
        harness.close()
