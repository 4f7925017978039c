"""The embedding service sees the minimum, and its failures are harmless (real Postgres, real HTTP).

Unchanged text sends nothing, duplicate text comes from the content-hash cache, a
row that changes nothing a device sees is not written nor logged, a wrong-shaped
answer from any embedder leaves rows pending with the error, and outages of 503 and
429 let the stream go on lexically until the fill pass completes every vector.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import psycopg
import pytest
from slipstream.index import HashingEmbedder, IndexDoc, PostgresBackend, SearchIndex
from slipstream.index.errors import EmbedderChangedError
from slipstream.worker.breaker import CircuitBreaker
from slipstream.worker.embedders import HttpEmbedder
from slipstream.worker.errors import RetryPolicy
from slipstream.worker.observe import Metrics

from .fake_openai import FakeEmbeddings, model_vectors
from .worker_harness import Harness

DIM = 32


@pytest.fixture
def fake():
    with FakeEmbeddings({"emb-a": DIM, "emb-b": DIM}) as server:
        yield server


def http(fake: FakeEmbeddings, model: str = "emb-a", **kw) -> HttpEmbedder:
    kw.setdefault("retry", RetryPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=2))
    kw.setdefault("breaker", CircuitBreaker(failure_threshold=3, reset_seconds=0.3))
    return HttpEmbedder(fake.url, model, DIM, api_key="sk-test", **kw)


def doc(i: str, title: str, body: str = "", **kw) -> IndexDoc:
    return IndexDoc("note", i, title=title, body=body, partition=kw.pop("partition", "p"), **kw)


def count(dsn: str, query: str) -> int:
    with psycopg.connect(dsn) as conn:
        return int(conn.execute(query).fetchone()[0])


def test_unchanged_text_duplicate_text_and_no_op_updates(pg_dsn: str, fake: FakeEmbeddings) -> None:
    backend = PostgresBackend(pg_dsn, spaces={"local": DIM})
    metrics = Metrics()
    index = SearchIndex(backend, http(fake), observer=metrics.index_event)
    try:
        assert index.upsert_many([doc("1", "red apples"), doc("2", "green pears"),
                                  doc("3", "blue plums")]) == 3
        assert sorted(fake.texts()) == ["blue plums", "green pears", "red apples"]
        stored = backend.get("note", "1")["vectors"]["local"]
        assert np.allclose(stored, model_vectors("emb-a", DIM, ["red apples"])[0])

        fake.reset()  # attrs change, same text: written, nothing sent, vector kept
        assert index.upsert_many([doc("1", "red apples", attrs={"k": "v"})]) == 1
        assert fake.texts() == []
        row = backend.get("note", "1")
        assert row["attrs"] == {"k": "v"} and np.allclose(row["vectors"]["local"], stored)

        before = row["updated_at"]  # identical again: not written at all
        assert index.upsert_many([doc("1", "red apples", attrs={"k": "v"})]) == 0
        assert backend.get("note", "1")["updated_at"] == before and fake.texts() == []

        # a new row whose text was embedded before: from the cache, no call
        assert index.upsert_many([doc("4", "green pears")]) == 1
        assert fake.texts() == []
        assert np.allclose(backend.get("note", "4")["vectors"]["local"],
                           model_vectors("emb-a", DIM, ["green pears"])[0])

        # changed text: exactly the changed texts, each distinct text once
        index.upsert_many([doc("2", "yellow pears"), doc("3", "blue plums", attrs={"x": 1}),
                           doc("5", "yellow pears")])
        assert fake.texts() == ["yellow pears"]
        sample = metrics.registry.get_sample_value
        assert sample("slipstream_embed_cache_total", {"space": "local", "result": "hit"}) == 1
        assert sample("slipstream_embed_cache_total", {"space": "local", "result": "miss"}) == 5
        assert sample("slipstream_embed_cache_total", {"space": "local", "result": "reused"}) == 2
        assert sample("slipstream_embed_noop_updates_total") == 1
    finally:
        backend.close()


def test_wrong_shape_from_any_embedder_leaves_rows_pending_with_the_error(pg_dsn: str) -> None:
    class Broken:
        dim = DIM
        embedder_id = "test:broken:32"

        def embed(self, texts):
            return np.ones((len(texts), DIM - 1), dtype=np.float32)  # one short

    backend = PostgresBackend(pg_dsn, spaces={"local": DIM})
    try:
        index = SearchIndex(backend, Broken())
        assert index.upsert_many([doc("1", "written anyway"), doc("2", "me too")]) == 2
        row = backend.get("note", "1")
        assert list(row["pending_spaces"]) == ["local"] and row["vectors"] == {}
        assert "shape" in row["pending_error"]
        assert [r.object_id for r in index.search("written", partition="p")] == ["1"]
    finally:
        backend.close()


def test_the_cache_is_bounded(pg_dsn: str) -> None:
    backend = PostgresBackend(pg_dsn, spaces={"local": DIM}, cache_max_rows=10)
    try:
        index = SearchIndex(backend, HashingEmbedder(DIM))
        for start in range(0, 40, 5):
            index.upsert_many([doc(str(i), f"text number {i}") for i in range(start, start + 5)])
            assert count(pg_dsn, "SELECT count(*) FROM slipstream.embed_cache") <= 10
        # the most recently used survive: the last batch's texts are still cached
        got, _ = index.embed_texts("local", ["text number 39"])
        assert 0 in got
    finally:
        backend.close()


def test_another_embedder_on_a_filled_space_is_refused(pg_dsn: str, fake: FakeEmbeddings) -> None:
    backend = PostgresBackend(pg_dsn, spaces={"local": DIM})
    try:
        SearchIndex(backend, http(fake, "emb-b"))  # an empty space takes any embedder
        SearchIndex(backend, http(fake, "emb-a")).upsert(doc("1", "hello"))
        with pytest.raises(EmbedderChangedError, match="slipstream reembed --space local"):
            SearchIndex(backend, http(fake, "emb-b"))
        SearchIndex(backend, http(fake, "emb-a"))  # the same one is fine
    finally:
        backend.close()


NOTES = """
CREATE TABLE public.notes (
    id serial PRIMARY KEY, owner text NOT NULL, title text, body text,
    status text NOT NULL DEFAULT 'open', views integer NOT NULL DEFAULT 0
);
"""


def changes(dsn: str) -> int:
    return count(dsn, "SELECT count(*) FROM slipstream.changes")


def test_worker_sends_nothing_and_logs_nothing_for_non_text_updates(pg_dsn: str, fake) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(NOTES)
        conn.execute("INSERT INTO notes (owner, title, body) SELECT 'alice', 'note ' || g, "
                     "'body of ' || g FROM generate_series(1, 20) g")
    harness = Harness(pg_dsn, embedder=http(fake))
    harness.setup()
    harness.start()
    try:
        assert len(fake.texts()) == 20
        logged = changes(pg_dsn)
        fake.reset()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("UPDATE notes SET views = views + 1")  # not mapped: devices see nothing
            conn.execute("UPDATE notes SET views = views + 1 WHERE id <= 5")
        harness.wait_caught_up()
        assert fake.texts() == [] and changes(pg_dsn) == logged
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("UPDATE notes SET status = 'done' WHERE id <= 3")  # attrs: logged, not sent
            conn.execute("UPDATE notes SET body = 'new body' WHERE id = 4")
        harness.wait_caught_up()
        assert fake.texts() == ["note 4\nnew body"]
        assert changes(pg_dsn) == logged + 4
    finally:
        harness.close()


@pytest.mark.parametrize("outage", ["503", "429:0.05"])
def test_outage_streams_on_lexically_and_every_row_gets_its_vector(pg_dsn: str, fake, outage) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(NOTES)
    harness = Harness(pg_dsn, embedder=http(fake))
    metrics = Metrics()
    harness.index.observer = metrics.index_event
    harness.settings = dataclasses.replace(harness.settings, pending_interval=0.2)
    harness.setup()
    fake.mode = outage

    def gauge() -> float | None:
        return metrics.registry.get_sample_value("slipstream_pending_embeddings",
                                                 {"space": "local"})

    def wait_gauge(value: float) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and gauge() != value:
            time.sleep(0.05)
        assert gauge() == value, (harness.error, harness.events[-3:])  # set by the fill pass
    harness.start()
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for i in range(30):
                conn.execute("INSERT INTO notes (owner, title) VALUES ('alice', %s)", (f"outage row {i}",))
        harness.wait_caught_up(timeout=60)  # the stream went on: lag is bounded by the retry budget
        assert count(pg_dsn, "SELECT count(*) FROM slipstream.docs WHERE NOT deleted") == 30
        pending = count(pg_dsn, "SELECT count(*) FROM slipstream.docs WHERE pending_spaces <> '{}'")
        assert pending == 30
        assert count(pg_dsn, "SELECT count(*) FROM slipstream.docs WHERE pending_error IS NULL") == 0
        assert [r.object_id for r in harness.index.search("outage row 7", partition="alice")][:1] == ["8"]
        wait_gauge(30)
        logged = changes(pg_dsn)
        fake.mode = None  # recovery: the fill pass completes every vector and logs it
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and count(
                pg_dsn, "SELECT count(*) FROM slipstream.docs WHERE pending_spaces <> '{}'"):
            time.sleep(0.1)
        assert count(pg_dsn, "SELECT count(*) FROM slipstream.docs WHERE emb_local IS NOT NULL") == 30
        assert count(pg_dsn, "SELECT count(*) FROM slipstream.docs WHERE pending_error IS NOT NULL") == 0
        assert changes(pg_dsn) == logged + 30
        wait_gauge(0)
        row = harness.backend.get("note", "8")
        assert np.allclose(row["vectors"]["local"], model_vectors("emb-a", DIM, ["outage row 7"])[0])
    finally:
        harness.close()


def test_a_batch_planned_while_the_previous_commits_compares_with_it(pg_dsn: str) -> None:
    """Regression: planning batch N+1 before N commits must not compare against the stale
    table — a text changed in N and changed back in N+1 is a real change, not a no-op."""
    from slipstream.worker.incoming import Batch, SourceChange, TxnEnd

    harness = Harness(pg_dsn)
    applier = harness.applier()
    columns = (("id", 23), ("owner", 25), ("title", 25), ("body", 25), ("status", 25))

    def batch(lsn: int, kind: str, title: str) -> Batch:
        values = {"id": "1", "owner": "ann", "title": title, "body": "", "status": "open"}
        return Batch(changes=[SourceChange(kind, "public.notes", lsn, key="[1]", values=values,
                                           columns=columns)],
                     completed=[TxnEnd(lsn, lsn + 1, 0.0)])

    try:
        applier.apply(batch(100, "insert", "alpha version"))
        second = applier.plan(batch(200, "update", "beta version"))
        third = applier.plan(batch(300, "update", "alpha version"))  # before `second` commits
        assert not third.prepared[0].unchanged
        applier.commit(second)
        applier.commit(third)
        row = harness.backend.get("note", "1")
        assert row["title"] == "alpha version"
        assert np.allclose(row["vectors"]["local"], HashingEmbedder(32).embed(["alpha version"])[0])
        assert changes(pg_dsn) == 3
        again = applier.apply(batch(400, "update", "alpha version"))  # now truly a no-op
        assert again.upserts == 0 and changes(pg_dsn) == 3
    finally:
        applier.close()
        harness.close()


def test_rows_the_service_keeps_refusing_do_not_hold_back_the_others(pg_dsn: str) -> None:
    class Picky:
        """Refuses a whole batch holding a bad text (no halving: any embedder may do this)."""

        dim = DIM
        embedder_id = "test:picky:32"
        down = True

        def embed(self, texts):
            if self.down or any("poison" in t for t in texts):
                raise RuntimeError("input rejected")
            return HashingEmbedder(DIM).embed(texts)

    embedder = Picky()
    harness = Harness(pg_dsn, embedder=embedder)
    applier = harness.applier()
    try:
        titles = ["poison a", "poison b", "poison c"] + [f"good row {i}" for i in range(6)]
        harness.index.upsert_many([doc(str(i), t) for i, t in enumerate(titles)])  # all pending
        embedder.down = False
        filled = [applier.fill_pending(limit=3) for _ in range(3)]
        assert filled == [0, 3, 3]  # the refused rows went to the back of the queue
        left = count(pg_dsn, "SELECT count(*) FROM slipstream.docs WHERE pending_spaces <> '{}'")
        assert left == 3
        assert "input rejected" in harness.backend.get("note", "0")["pending_error"]
        assert harness.backend.get("note", "5")["pending_error"] is None
    finally:
        applier.close()
        harness.close()
