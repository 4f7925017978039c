"""Search behaviour on both backends: BM25 by hand, scope isolation, tombstones, fusion options."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from slipstream.index import (
    HashingEmbedder,
    IndexDoc,
    SearchIndex,
    SQLiteBackend,
)
from slipstream.index.ranking import K1, W_BODY, W_TITLE, B

from .index_helpers import index_fixture

DIM = 64


index = index_fixture(DIM)


def test_bm25_matches_a_hand_computed_example(index: SearchIndex) -> None:
    index.upsert_many([
        IndexDoc("note", "a", title="apple pie", body="apple apple banana", partition="p"),
        IndexDoc("note", "b", title="banana", body="cherry cherry cherry cherry", partition="p"),
        IndexDoc("note", "c", title="", body="durian", partition="p"),
    ])
    # Terms: a: title [appl, pie], body [appl, appl, banana]; b: title [banana], body [cherri x4];
    # c: body [durian]. Query "apple banana" -> terms [appl, banana].
    n = 3
    lens = {"a": W_TITLE * 2 + W_BODY * 3, "b": W_TITLE * 1 + W_BODY * 4, "c": W_BODY * 1}
    avgdl = sum(lens.values()) / n
    idf = {t: math.log(1 + (n - df + 0.5) / (df + 0.5)) for t, df in (("appl", 1), ("banana", 2))}

    def part(tf: float, length: float, term: str) -> float:
        return idf[term] * tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / avgdl))

    expected_a = part(W_TITLE * 1 + W_BODY * 2, lens["a"], "appl") + part(W_BODY * 1, lens["a"], "banana")
    expected_b = part(W_TITLE * 1, lens["b"], "banana")
    lexical_only = SearchIndex(index.backend)  # no embedder: the lexical channel alone
    results = lexical_only.search("apple banana", partition="p", k=5)
    assert [r.object_id for r in results] == ["a", "b"]
    assert results[0].lexical_score == pytest.approx(expected_a, rel=1e-12)
    assert results[1].lexical_score == pytest.approx(expected_b, rel=1e-12)
    assert all(r.match_type == "lexical" for r in results)


def test_statistics_are_scoped_to_the_query_partitions(index: SearchIndex) -> None:
    index.upsert_many([
        IndexDoc("note", "a1", title="rare word", body="common text here", partition="A"),
        IndexDoc("note", "a2", title="other", body="common words", partition="A"),
        IndexDoc("note", "a3", title="third note", body="rare rare", partition="A"),
    ])
    before = [(r.key, r.score, r.lexical_score, r.semantic_score)
              for r in index.search("rare common", partition="A")]
    index.upsert_many([IndexDoc("note", f"b{i}", title="rare common", body="rare common rare " * 5,
                                partition="B") for i in range(30)])
    after = [(r.key, r.score, r.lexical_score, r.semantic_score)
             for r in index.search("rare common", partition="A")]
    assert before and before == after
    both = index.search("rare common", partition=["A", "B"], k=50)
    assert {r.partition for r in both} == {"A", "B"}
    a1 = {r.key: r.lexical_score for r in both}[("note", "a1", "leaf")]
    assert a1 != dict((k, ls) for k, _, ls, _ in before)[("note", "a1", "leaf")]


def test_tombstones_are_invisible_to_both_channels(index: SearchIndex) -> None:
    index.upsert_many([
        IndexDoc("note", "x", title="quantum entanglement", body="spooky action", partition="p"),
        IndexDoc("note", "y", title="entanglement", body="quantum", partition="p"),
    ])
    assert {r.object_id for r in index.search("quantum entanglement", partition="p")} == {"x", "y"}
    assert index.delete("note", "x") == 1
    results = index.search("quantum entanglement spooky action", partition="p")
    assert [r.object_id for r in results] == ["y"]
    qvec = HashingEmbedder(DIM).embed(["quantum entanglement spooky action"])[0]
    semantic_only = index.search("zzzz", partition="p", query_vector=qvec)
    assert [r.object_id for r in semantic_only] == ["y"]
    assert semantic_only.scope_size == 1
    row = index.backend.get("note", "x")
    assert row["deleted"] and row["title"] == "" and row["partition"] == "p"
    assert row["vectors"] == {}
    # An upsert revives the key.
    index.upsert(IndexDoc("note", "x", title="back again", partition="p"))
    assert [r.object_id for r in index.search("back", partition="p")] == ["x"]


def test_semantic_scores_are_exact_cosine(index: SearchIndex) -> None:
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(40, DIM)).astype(np.float32)
    docs = [IndexDoc("v", str(i), title=f"t{i}", partition="p") for i in range(40)]
    index.backend.write(index.prepare(docs, {i: {"local": vectors[i]} for i in range(40)}))
    q = rng.normal(size=DIM).astype(np.float32)
    results = index.search("nothing matches this", partition="p", query_vector=q, k=10)
    v64, q64 = vectors.astype(np.float64), q.astype(np.float64)
    cos = v64 @ q64 / (np.linalg.norm(v64, axis=1) * np.linalg.norm(q64))
    expected = [str(i) for i in sorted((i for i in range(40) if cos[i] > 0), key=lambda i: -cos[i])][:10]
    assert [r.object_id for r in results] == expected
    for r in results:
        assert r.semantic_score == pytest.approx(cos[int(r.object_id)], abs=1e-12)
        assert r.match_type == "semantic"
    assert not results.approximate


def test_collapse_reports_matched_node_kinds(index: SearchIndex) -> None:
    index.upsert_many([
        IndexDoc("note", "n9", title="meeting notes", body="hiring discussion", partition="p"),
        IndexDoc("note", "n9", node_kind="summary", title="hiring sync", body="open two roles",
                 partition="p"),
        IndexDoc("note", "n1", title="unrelated", body="hiring freeze", partition="p"),
    ])
    collapsed = index.search("hiring", partition="p")
    assert [r.object_id for r in collapsed].count("n9") == 1
    n9 = next(r for r in collapsed if r.object_id == "n9")
    assert n9.matched_node_kinds == ("leaf", "summary")
    flat = index.search("hiring", partition="p", collapse=False)
    assert sorted(r.key for r in flat if r.object_id == "n9") == [
        ("note", "n9", "leaf"), ("note", "n9", "summary")]


def test_diversity_cap_drops_rather_than_defers(index: SearchIndex) -> None:
    index.upsert_many([
        IndexDoc("tool", f"t{i}", title=f"refund charge {i}", partition="p",
                 attrs={"category": "finance" if i < 4 else "support"})
        for i in range(6)
    ])
    results = index.search("refund", partition="p", k=3, diversity_key="category", diversity_cap=1)
    assert len(results) == 2
    assert sorted(r.attrs["category"] for r in results) == ["finance", "support"]


def test_filters_by_type_kind_and_attrs_containment(index: SearchIndex) -> None:
    index.upsert_many([
        IndexDoc("tool", "a", title="refund", partition="p", attrs={"category": "finance", "n": 1}),
        IndexDoc("tool", "b", title="refund", partition="p", attrs={"category": "support", "n": 1.0}),
        IndexDoc("note", "c", title="refund", partition="p", attrs={"category": "finance", "ok": True}),
        IndexDoc("note", "c", node_kind="summary", title="refund", partition="p"),
    ])
    ids = lambda **kw: sorted(r.object_id for r in index.search("refund", partition="p", **kw))
    assert ids(object_types=["tool"]) == ["a", "b"]
    assert ids(attrs={"category": "finance"}) == ["a", "c"]
    assert ids(attrs={"n": 1}) == ["a", "b"]
    assert ids(attrs={"ok": True}) == ["c"]
    assert ids(attrs={"ok": 1}) == []
    assert [r.key for r in index.search("refund", partition="p", node_kinds=["summary"])] == [
        ("note", "c", "summary")]


def test_modes_weight_the_channels(index: SearchIndex) -> None:
    index.upsert_many([
        IndexDoc("d", "lex", title="invoice", body="zebra", partition="p"),
        IndexDoc("d", "sem", title="quarterly plan report", body="quarterly plan report", partition="p"),
    ])
    for mode, (wl, ws) in {"balanced": (1, 1), "precision": (1.5, 0.5), "explore": (0.5, 1.5)}.items():
        results = index.search("invoice quarterly plan report", partition="p", mode=mode, collapse=False)
        for r in results:
            expected = (wl / (60 + r.lexical_rank) if r.lexical_rank else 0) + (
                ws / (60 + r.semantic_rank) if r.semantic_rank else 0)
            assert r.score == pytest.approx(expected, abs=1e-15)


def test_embedding_outage_leaves_rows_lexical_only_and_pending(index: SearchIndex) -> None:
    class Down:  # the same service as the index's embedder, unreachable for now
        dim = DIM
        embedder_id = index.embedders["local"].embedder_id

        def embed(self, texts):
            raise ConnectionError("embedding service unreachable")

    flaky = SearchIndex(index.backend, {"local": Down()})
    flaky.upsert(IndexDoc("note", "1", title="offline write", partition="p"))
    row = index.backend.get("note", "1")
    assert list(row["pending_spaces"] if not isinstance(row["pending_spaces"], str)
                else __import__("json").loads(row["pending_spaces"])) == ["local"]
    assert row["vectors"] == {}
    assert [r.object_id for r in flaky.search("offline", partition="p")] == ["1"]


def test_sqlite_matrix_sees_writes_from_another_connection(tmp_path) -> None:
    path = tmp_path / "shard.db"
    reader = SearchIndex(SQLiteBackend(path, spaces={"local": DIM}), HashingEmbedder(DIM))
    writer = SearchIndex(SQLiteBackend(path, spaces={"local": DIM}), HashingEmbedder(DIM))
    writer.upsert(IndexDoc("n", "1", title="first", partition="p"))
    q = HashingEmbedder(DIM).embed(["second"])[0]
    assert [r.object_id for r in reader.search("x", query_vector=q)] == []
    writer.upsert(IndexDoc("n", "2", title="second", partition="p"))
    assert [r.object_id for r in reader.search("x", query_vector=q)] == ["2"]


def test_device_results_show_each_row_as_last_written(tmp_path) -> None:
    """A device result's partition, title, payload and attrs come from the shard's
    in-memory copy: it must follow this connection's writes, another connection's writes
    and deletes, exactly as the stored row reads."""
    path = tmp_path / "shard.db"
    device = SearchIndex(SQLiteBackend(path, spaces={"local": DIM}), HashingEmbedder(DIM))
    other = SearchIndex(SQLiteBackend(path, spaces={"local": DIM}), HashingEmbedder(DIM))
    device.upsert_many([IndexDoc("n", str(i), title=f"plum {i}", body="orchard", partition="p",
                                 payload={"v": i}, attrs={"c": "red"}) for i in range(5)])

    def shown() -> dict[str, tuple]:
        hits = device.search("plum orchard", k=10)
        return {r.object_id: (r.partition, r.title, r.payload, r.attrs) for r in hits}

    assert shown()["3"] == ("p", "plum 3", {"v": 3}, {"c": "red"})
    # Same terms, new payload and attrs (this connection), then a new partition.
    device.upsert(IndexDoc("n", "3", title="plum 3", body="orchard", partition="p",
                           payload={"v": "three"}, attrs={"c": "blue"}))
    assert shown()["3"] == ("p", "plum 3", {"v": "three"}, {"c": "blue"})
    device.upsert(IndexDoc("n", "3", title="plum 3", body="orchard", partition="q",
                           payload={"v": "three"}, attrs={"c": "blue"}))
    assert shown()["3"][0] == "q"
    # Another connection's update and delete.
    other.upsert(IndexDoc("n", "1", title="plum one", body="orchard", partition="p",
                          payload={"v": [1]}, attrs={}))
    other.backend.delete("n", "2")
    now = shown()
    assert now["1"] == ("p", "plum one", {"v": [1]}, {}) and "2" not in now
    backend = device.backend
    for object_id, (partition, title, payload, attrs) in now.items():
        row = backend.get("n", object_id)
        assert (row["partition"], row["title"], json.loads(row["payload"]),
                json.loads(row["attrs"])) == (partition, title, payload, attrs)
    # Parsed afresh for every result: a caller changing one cannot change the next.
    device.search("plum orchard", k=10)[0].payload["v"] = "changed"
    assert "changed" not in [p[2]["v"] for p in shown().values()]
