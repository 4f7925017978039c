"""The HNSW side tables (`pg_ann`): a row is searchable above the exact limit from the
commit that wrote it, before its side-table entry exists; stale entries never show a
moved, deleted or rewritten row as it was; the queue loses no write that races the
indexer; an HNSW index on ``docs`` from before moves to the side table."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import psycopg
import pytest
from slipstream.index import IndexDoc, PostgresBackend, SearchIndex

DIM = 8


def ann_differences(dsn: str, space: str, schema: str = "slipstream") -> list[tuple]:
    """Side-table rows that do not match the live row with a vector in ``docs`` exactly
    (id, partition, vector), and live rows with a vector missing from the side table."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            f'SELECT coalesce(a.id, d.id), a.partition, d.partition FROM "{schema}"."ann_{space}" a '
            f'FULL JOIN (SELECT id, partition, emb_{space} AS v FROM "{schema}".docs '
            f"WHERE NOT deleted AND emb_{space} IS NOT NULL) d ON d.id = a.id "
            "WHERE a.id IS NULL OR d.id IS NULL OR a.partition <> d.partition OR a.v <> d.v"
        ).fetchall()


def unindexed_without_queue(conn: psycopg.Connection, space: str) -> int:
    """Live rows with a vector that have neither their current side-table entry nor a
    queue entry, in the connection's snapshot: these would be unsearchable by HNSW."""
    return conn.execute(
        f"SELECT count(*) FROM slipstream.docs d WHERE NOT d.deleted AND d.emb_{space} IS NOT NULL "
        f"AND NOT EXISTS (SELECT 1 FROM slipstream.ann_{space} a WHERE a.id = d.id "
        f"AND a.partition = d.partition AND a.v = d.emb_{space}) "
        "AND NOT EXISTS (SELECT 1 FROM slipstream.ann_queue q WHERE q.id = d.id)").fetchone()[0]


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def deferred(pg_dsn: str):
    """A backend whose queue only drains when the test says so (as under the worker)."""
    backend = PostgresBackend(pg_dsn, spaces={"local": DIM}, exact_limit=5, defer_ann=True)
    yield backend, SearchIndex(backend)
    backend.close()


def write(index: SearchIndex, rows: dict[str, tuple[str, np.ndarray]]) -> None:
    docs = [IndexDoc("v", k, title=f"row {k}", partition=p) for k, (p, _) in rows.items()]
    index.backend.write(index.prepare(docs, {i: {"local": v} for i, (_, v) in enumerate(rows.values())}))


def top(index: SearchIndex, partition: str, q: np.ndarray, k: int = 3):
    results = index.search("", partition=partition, query_vector=q, k=k)
    return [(r.object_id, r.semantic_score) for r in results], results.approximate


def indexed(index: SearchIndex, rng: np.random.Generator, partition: str, n: int) -> dict:
    """`n` rows in `partition`, indexed: more than a search's depth (50), so HNSW
    answers there instead of the exact fallback for a short answer."""
    vectors = {f"{partition}{i}": unit(rng) for i in range(n)}
    write(index, {k: (partition, v) for k, v in vectors.items()})
    index.backend.drain_ann()
    return vectors


def test_a_row_is_searchable_above_the_exact_limit_before_its_entry_exists(deferred, pg_dsn) -> None:
    backend, index = deferred
    rng = np.random.default_rng(1)
    indexed(index, rng, "p", 80)
    new = {f"new{i}": unit(rng) for i in range(10)}
    write(index, {k: ("p", v) for k, v in new.items()})
    assert backend.ann_queue_rows() == 10 and len(ann_differences(pg_dsn, "local")) == 10
    before = {}
    for key, v in new.items():
        found, approximate = top(index, "p", v)
        assert approximate and found[0] == (key, pytest.approx(1.0, abs=1e-6))  # from the queue
        before[key] = found
    assert backend.drain_ann() == 10
    assert backend.ann_queue_rows() == 0 and ann_differences(pg_dsn, "local") == []
    for key, v in new.items():
        assert top(index, "p", v) == (before[key], True)  # the same answer from the HNSW index


def test_stale_entries_never_show_a_row_as_it_was(deferred, pg_dsn) -> None:
    backend, index = deferred
    rng = np.random.default_rng(2)
    vectors = indexed(index, rng, "p", 80)
    indexed(index, rng, "q", 60)
    moved, deleted, rewritten = "p3", "p5", "p7"
    new_vector = unit(rng)
    write(index, {moved: ("q", vectors[moved]), rewritten: ("p", new_vector)})
    backend.delete("v", deleted)
    assert len(ann_differences(pg_dsn, "local")) == 3  # the side table is stale now
    found, approximate = top(index, "p", vectors[moved])
    assert approximate and moved not in dict(found)  # its entry still says p: the join drops it
    found, approximate = top(index, "p", vectors[deleted])
    assert approximate and deleted not in dict(found)
    found, approximate = top(index, "q", vectors[moved])
    assert approximate and found[0] == (moved, pytest.approx(1.0, abs=1e-6))  # in q, from the queue
    found, _ = top(index, "p", vectors[rewritten], k=10)  # its old entry may find it ...
    expected = float(np.dot(new_vector.astype(np.float64), vectors[rewritten].astype(np.float64)))
    if rewritten in dict(found):  # ... but it is scored by its new vector
        assert dict(found)[rewritten] == pytest.approx(expected, abs=1e-6)
    found, _ = top(index, "p", new_vector)
    assert found[0] == (rewritten, pytest.approx(1.0, abs=1e-6))
    backend.drain_ann()
    assert ann_differences(pg_dsn, "local") == []


def test_the_queue_loses_no_write_that_races_the_indexer(deferred, pg_dsn) -> None:
    """Writers commit upserts, moves and tombstones while the indexer drains in small
    steps. In every snapshot, each live row with a vector has its current entry or a
    queue entry; after a last drain the side table equals ``docs`` exactly. A queue
    keyed by row (an entry the indexer deletes after reading an older version of the
    row) fails this, and so do two drains at once without the lock (the older state of
    a row written last)."""
    backend, index = deferred
    rng = np.random.default_rng(3)
    keys = [str(i) for i in range(40)]
    write(index, {k: ("p", unit(rng)) for k in keys})
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        r = random.Random(seed)
        g = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                k = r.choice(keys)
                if r.random() < 0.15:
                    backend.delete("v", k)
                else:
                    write(index, {k: (r.choice("pq"), unit(g))})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def indexer() -> None:
        try:
            while not stop.is_set():
                backend.index_queued(limit=3)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)] + [
        threading.Thread(target=indexer) for _ in range(2)]  # two: a reembed drains too
    for t in threads:
        t.start()
    checks = 0
    try:
        with psycopg.connect(pg_dsn) as conn:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    assert unindexed_without_queue(conn, "local") == 0
                checks += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors and checks > 10
    backend.drain_ann()
    assert backend.ann_queue_rows() == 0
    assert ann_differences(pg_dsn, "local") == []


def test_library_writes_drain_the_queue_and_exact_mode_has_none(pg_dsn: str) -> None:
    backend = PostgresBackend(pg_dsn, spaces={"local": DIM}, exact_limit=5)
    index = SearchIndex(backend)
    write(index, {str(i): ("p", unit(np.random.default_rng(i))) for i in range(10)})
    backend.delete("v", "4")
    assert backend.ann_queue_rows() == 0 and ann_differences(pg_dsn, "local") == []
    backend.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA plain")
    exact = PostgresBackend(pg_dsn, schema="plain", spaces={"local": DIM}, hnsw=False)
    write(SearchIndex(exact), {"1": ("p", unit(np.random.default_rng(1)))})
    with psycopg.connect(pg_dsn) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'plain'")}
        triggers = conn.execute("SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                                "WHERE n.nspname = 'plain' AND NOT t.tgisinternal").fetchone()[0]
        queued = conn.execute("SELECT count(*) FROM plain.ann_queue").fetchone()[0]
    assert "ann_local" not in tables and triggers == 0 and queued == 0
    exact.close()


def test_an_hnsw_index_on_docs_moves_to_the_side_table(pg_dsn: str) -> None:
    backend = PostgresBackend(pg_dsn, spaces={"local": DIM}, hnsw=False)
    rng = np.random.default_rng(4)
    vectors = {str(i): unit(rng) for i in range(60)}
    write(SearchIndex(backend), {k: ("p", v) for k, v in vectors.items()})
    backend.delete("v", "3")
    backend.close()
    with psycopg.connect(pg_dsn) as conn:  # the layout before side tables
        conn.execute("CREATE INDEX docs_emb_local_hnsw ON slipstream.docs "
                     "USING hnsw (emb_local vector_cosine_ops)")
    backend = PostgresBackend(pg_dsn, spaces={"local": DIM}, exact_limit=5)
    with psycopg.connect(pg_dsn) as conn:
        indexes = conn.execute("SELECT tablename, indexname FROM pg_indexes "
                               "WHERE indexdef LIKE '%hnsw%'").fetchall()
    assert indexes == [("ann_local", "ann_local_hnsw")]
    assert ann_differences(pg_dsn, "local") == [] and backend.ann_queue_rows() == 0
    reader = PostgresBackend(pg_dsn, spaces={"local": DIM}, create_schema=False)
    assert reader.ann_spaces == {"local"}  # a schema made elsewhere is read as it is
    reader.close()
    found, approximate = top(SearchIndex(backend), "p", vectors["11"])
    assert approximate and found[0] == ("11", pytest.approx(1.0, abs=1e-6))
    backend.close()


def test_the_worker_keeps_the_side_table_current_under_a_steady_stream(pg_dsn: str) -> None:
    from .worker_harness import NOTES_DDL, Harness

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(NOTES_DDL)
    h = Harness(pg_dsn)
    try:
        h.setup()
        h.start()
        indexed_while_writing = 0
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            deadline = time.monotonic() + 2.0
            i = 0
            while time.monotonic() < deadline:  # one row per transaction, no pause
                conn.execute("INSERT INTO notes (owner, title, body) VALUES (%s, %s, %s)",
                             (f"u{i % 3}", f"note {i}", f"body of note {i}"))
                if i % 5 == 4:
                    conn.execute("UPDATE notes SET owner = 'u9' WHERE id = %s", (i - 2,))
                i += 1
                indexed_while_writing = h.runner.ann.indexed if h.runner.ann else 0
        h.wait_caught_up()
        assert indexed_while_writing > 0  # the indexer had turns during the stream
        deadline = time.monotonic() + 30
        while h.backend.ann_queue_rows() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert h.backend.ann_queue_rows() == 0
        assert ann_differences(pg_dsn, "local") == []
        with psycopg.connect(pg_dsn) as conn:
            (live,) = conn.execute("SELECT count(*) FROM slipstream.docs WHERE NOT deleted").fetchone()
        assert live == i
    finally:
        h.close()


def test_a_large_backlog_is_rebuilt_in_one_go_and_keeps_rows_written_meanwhile(
        deferred, pg_dsn, monkeypatch) -> None:
    from slipstream.index import pg_ann

    backend, index = deferred
    monkeypatch.setattr(pg_ann, "REBUILD_MIN", 40)
    rng = np.random.default_rng(5)
    indexed(index, rng, "p", 80)
    write(index, {f"b{i}": ("p", unit(rng)) for i in range(60)})
    assert backend.ann_step(limit=10) == 10  # a drain first: no backlog seen yet
    assert backend.ann_step(limit=10) == 50  # 50 of 140 wait: rebuilt, every entry taken
    assert backend.ann_queue_rows() == 0 and ann_differences(pg_dsn, "local") == []
    assert backend.ann_step(limit=10) == 0
    stop = threading.Event()

    def writer() -> None:
        g = np.random.default_rng(6)
        while not stop.is_set():
            write(index, {f"w{g.integers(30)}": (str(g.choice(["p", "q"])), unit(g))})

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(5):  # writes commit before, during and after each build
            backend.rebuild_ann()
    finally:
        stop.set()
        t.join()
    backend.drain_ann()
    assert ann_differences(pg_dsn, "local") == []
    with psycopg.connect(pg_dsn) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE 'ann%'")}
        indexes = {r[0] for r in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'ann_local'")}
    assert tables == {"ann_local", "ann_queue"} and indexes == {"ann_local_hnsw", "ann_local_pkey"}
    found, approximate = top(index, "p", unit(np.random.default_rng(7)))
    assert approximate and len(found) == 3


def test_a_failed_drain_after_a_library_write_leaves_the_write_committed(pg_dsn: str,
                                                                         monkeypatch) -> None:
    backend = PostgresBackend(pg_dsn, spaces={"local": DIM}, exact_limit=5)
    index = SearchIndex(backend)
    rng = np.random.default_rng(8)
    indexed(index, rng, "p", 60)

    def down(limit: int = 0, conn=None) -> int:
        raise psycopg.OperationalError("the server closed the connection")

    monkeypatch.setattr(backend, "index_queued", down)
    v = unit(rng)
    write(index, {"late": ("p", v)})  # no exception: the row is committed
    monkeypatch.undo()
    assert backend.ann_queue_rows() == 1
    found, approximate = top(index, "p", v)
    assert approximate and found[0] == ("late", pytest.approx(1.0, abs=1e-6))  # from the queue
    backend.close()


def test_a_second_start_takes_no_lock_on_docs(pg_dsn: str) -> None:
    """Creating the backend again finds the side table and triggers in place and runs no
    DDL: a transaction holding a row lock on docs does not block it."""
    PostgresBackend(pg_dsn, spaces={"local": DIM}).close()
    with psycopg.connect(pg_dsn) as holder:
        holder.execute("LOCK TABLE slipstream.docs IN ROW EXCLUSIVE MODE")  # a writer mid-transaction
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("ALTER DATABASE " + conn.info.dbname + " SET lock_timeout = '2s'")
        again = PostgresBackend(pg_dsn, spaces={"local": DIM})  # CREATE TRIGGER would wait here
        assert again.ann_spaces == {"local"}
        again.close()
