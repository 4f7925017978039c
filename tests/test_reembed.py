"""Changing a space's model: a shadow column filled beside the running writer, one atomic switch.

Searches see only the old model's vectors until the switch and only the new model's
after it; rows written meanwhile are re-embedded too; devices get every row of the
space through the change log; an interrupted re-embed resumes.
"""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from slipstream.index import IndexDoc, PostgresBackend, SearchIndex
from slipstream.index.errors import EmbedderChangedError
from slipstream.worker.breaker import CircuitBreaker
from slipstream.worker.embedders import HttpEmbedder
from slipstream.worker.errors import RetryPolicy
from slipstream.worker.reembed import Progress, reembed_space
from slipstream.worker.state import WorkerState

from .fake_openai import FakeEmbeddings, model_vectors
from .test_ann import ann_differences

DIM = 32


@pytest.fixture
def fake():
    with FakeEmbeddings({"emb-a": DIM, "emb-b": DIM}) as server:
        yield server


def http(fake: FakeEmbeddings, model: str) -> HttpEmbedder:
    return HttpEmbedder(fake.url, model, DIM, retry=RetryPolicy(initial_delay=0.01, max_attempts=1),
                        breaker=CircuitBreaker(failure_threshold=100))


def stored_vectors(dsn: str) -> dict[str, tuple[str, np.ndarray]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT object_id, title, emb_local::text FROM slipstream.docs "
                            "WHERE NOT deleted").fetchall()
    return {i: (t, np.asarray([float(x) for x in v.strip("[]").split(",")], np.float32))
            for i, t, v in rows}


def model_of(dsn: str) -> set[str]:
    """Which model made each stored vector: 'emb-a', 'emb-b' or 'neither'."""
    out = set()
    for title, vec in stored_vectors(dsn).values():
        a, b = (model_vectors(m, DIM, [title])[0] for m in ("emb-a", "emb-b"))
        out.add("emb-a" if np.allclose(vec, a) else "emb-b" if np.allclose(vec, b) else "neither")
    return out


def top_semantic(index: SearchIndex, model: str, text: str) -> float:
    qv = model_vectors(model, DIM, [text])[0]
    results = index.search("", query_vector=qv, partition="p", k=1)
    return results[0].semantic_score


def docs(n: int, start: int = 0) -> list[IndexDoc]:
    return [IndexDoc("note", str(i), title=f"note number {i} about topic {i % 7}", partition="p")
            for i in range(start, start + n)]


def test_reembed_fills_a_shadow_and_switches_atomically(pg_dsn: str, fake: FakeEmbeddings) -> None:
    backend = PostgresBackend(pg_dsn, spaces={"local": DIM})
    state = WorkerState()
    with psycopg.connect(pg_dsn) as conn:
        state.migrate(conn)
    old = SearchIndex(backend, http(fake, "emb-a"))
    old.upsert_many(docs(40))
    with pytest.raises(EmbedderChangedError, match="slipstream reembed --space local"):
        SearchIndex(backend, http(fake, "emb-b"))
    new = SearchIndex(backend, http(fake, "emb-b"), check_embedders=False)

    writer = psycopg.connect(pg_dsn)  # the running worker holds the apply writer
    state.claim_writer(writer, "slipstream")
    writer.commit()
    seen: list[Progress] = []

    def progress(p: Progress) -> None:
        seen.append(p)
        if p.phase == "switched":
            return
        assert model_of(pg_dsn) == {"emb-a"}  # searches read only the old vectors
        assert top_semantic(old, "emb-a", "note number 4 about topic 4") == pytest.approx(1.0, abs=1e-5)
        if len(seen) == 1:  # the old worker writes meanwhile: a new row and a changed text
            old.upsert_many([IndexDoc("note", "3", title="note number 3 rewritten", partition="p"),
                             *docs(2, start=100)])
        if p.phase == "waiting for the writer":
            writer.close()  # the worker stops: the switch may happen

    last = reembed_space(backend, new, state, "slipstream", "local", batch=7, progress=progress,
                         idle_sleep=0.05)
    assert last.phase == "switched" and last.done == last.total == 42
    assert any(p.phase == "filling" for p in seen)
    assert model_of(pg_dsn) == {"emb-b"}  # and only the new ones after
    assert top_semantic(new, "emb-b", "note number 3 rewritten") == pytest.approx(1.0, abs=1e-5)
    with psycopg.connect(pg_dsn) as conn:
        logged = conn.execute("SELECT count(DISTINCT object_id) FROM slipstream.changes").fetchone()[0]
        (cp_seq,) = conn.execute("SELECT last_seq FROM slipstream.checkpoints").fetchone()
        (max_seq,) = conn.execute("SELECT max(seq) FROM slipstream.changes").fetchone()
        cols = {r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'docs'")}
        hnsw = conn.execute("SELECT tablename, indexname, indexdef FROM pg_indexes "
                            "WHERE indexdef LIKE '%hnsw%'").fetchall()
    assert logged == 42 and cp_seq == max_seq  # devices refetch every row of the space
    assert not any(c.startswith("emb_local__") for c in cols)
    # The HNSW side table was built from the shadow column and swapped in with it.
    assert [(t, n, "(v vector_cosine_ops)" in d) for t, n, d in hnsw] == [
        ("ann_local", "ann_local_hnsw", True)]
    backend.drain_ann()
    assert ann_differences(pg_dsn, "local") == []
    SearchIndex(backend, http(fake, "emb-b")).upsert_many(docs(1, start=200))  # accepted now
    with pytest.raises(EmbedderChangedError):
        SearchIndex(backend, http(fake, "emb-a"))
    backend.close()


def test_an_interrupted_reembed_resumes_without_resending(pg_dsn: str, fake: FakeEmbeddings) -> None:
    backend = PostgresBackend(pg_dsn, spaces={"local": DIM})
    state = WorkerState()
    with psycopg.connect(pg_dsn) as conn:
        state.migrate(conn)
    SearchIndex(backend, http(fake, "emb-a")).upsert_many(docs(30))
    new = SearchIndex(backend, http(fake, "emb-b"), check_embedders=False)

    class Stop(Exception):
        pass

    def stop_early(p: Progress) -> None:
        if p.phase == "filling" and p.done >= 10:
            raise Stop

    fake.reset()
    with pytest.raises(Stop):
        reembed_space(backend, new, state, "slipstream", "local", batch=10, progress=stop_early)
    first = len(fake.texts())
    assert model_of(pg_dsn) == {"emb-a"}
    last = reembed_space(backend, new, state, "slipstream", "local", batch=10)
    assert last.phase == "switched" and model_of(pg_dsn) == {"emb-b"}
    assert 10 <= first < 30 and len(fake.texts()) == 30  # each text sent once across both runs
    assert reembed_space(backend, new, state, "slipstream", "local").phase == "current"
    backend.close()


def test_the_rate_limit_spaces_out_the_texts() -> None:
    from slipstream.worker.reembed import RateLimit

    slept: list[float] = []
    limit = RateLimit(100.0, sleep=slept.append)
    limit.take(50)
    limit.take(150)
    assert slept and 1.5 <= slept[-1] <= 2.0  # 200 texts at 100/s: about 2 s in
    RateLimit(None, sleep=slept.append).take(10_000)
    assert len(slept) == 2
