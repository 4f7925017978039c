"""A small batch's apply transaction goes out as one query with client-side parameters:
it must store exactly what the statement-by-statement transaction stores, byte for byte.

Two schemas in one database get the same batches, one through each path; every table
the apply transaction writes is then compared (vectors as pgvector's shortest text, so
bit-identical or not equal), and the vectors against the embedder's own output.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import psycopg
import pytest
import slipstream.worker.apply as apply_mod
from slipstream.index import HashingEmbedder, IndexDoc, PostgresBackend, SearchIndex
from slipstream.index.pg_writes import vector_text
from slipstream.worker.apply import Applier
from slipstream.worker.incoming import Batch, SourceChange, TxnEnd
from slipstream.worker.state import WorkerState

DIM = 48
COLUMNS = (("id", 23), ("title", 25), ("body", 25), ("tags", 25))
TRICKY = ["it's a 'quote'", 'double "quotes" and \\ backslash \\\\', "50% off %s %(x)s {}",
          "naïve café — Ünïcödé ﬁ ligature ẞ", "日本語のテキスト と 中文", "emoji 🎉🚀 and\ttab\nnewline",
          "", "  spaces  ", "semi; colon; DROP TABLE x; --", "$$ dollar $tag$ quoting"]


def mapper(row: Mapping[str, object], op: str) -> list[IndexDoc]:
    if row["title"] == "boom":
        raise RuntimeError("mapper exploded: it's 100% on purpose")
    tags = str(row["tags"] or "")
    return [IndexDoc("item", str(row["id"]), title=str(row["title"] or ""), body=str(row["body"] or ""),
                     keywords=[t for t in tags.split(",") if t], partition=f"p'{int(row['id']) % 3}",
                     payload={"title": row["title"], "n": row["id"], "nested": {"q": "a'b\\c"}},
                     attrs={"tag": tags})]


def change(kind: str, lsn: int, i: int, title: str, body: str, tags: str = "a,b") -> SourceChange:
    return SourceChange(kind, "public.items", lsn, 0, f"[{i}]",
                        {"id": str(i), "title": title, "body": body, "tags": tags}, COLUMNS)


def batches() -> list[Batch]:
    out, lsn = [], 0x1000000
    script: list[list[SourceChange]] = []
    for n in range(len(TRICKY)):
        lsn += 100
        script.append([change("insert", lsn, n, TRICKY[n], TRICKY[-1 - n] * (1 + n),
                              tags=TRICKY[(n + 3) % len(TRICKY)].replace(",", ""))])
    lsn += 100
    script.append([change("insert", lsn, 100 + j, f"many {j}", f"body {j} " * 40) for j in range(12)])
    lsn += 100
    script.append([change("update", lsn, 1, "changed title", "changed body"),  # text changed
                   change("update", lsn, 2, TRICKY[2], TRICKY[-3] * 3, tags="new tags"),  # attrs only
                   SourceChange("delete", "public.items", lsn, 2, "[3]"),
                   change("insert", lsn, 200, "boom", "a dead letter's row")])
    lsn += 100
    script.append([change("update", lsn, 4, TRICKY[4], TRICKY[-5] * 5,
                          tags=TRICKY[7].replace(",", ""))])  # identical: a no-op
    lsn += 100
    script.append([SourceChange("truncate", "public.items", lsn, truncated=("public.items",))])
    lsn += 100
    script.append([change("insert", lsn, 5, "after truncate", "back again")])
    for changes in script:
        b = Batch(changes=changes)
        b.completed.append(TxnEnd(changes[0].commit_lsn, changes[0].commit_lsn + 50, 0.0))
        out.append(b)
    return out


def snapshot(dsn: str, schema: str) -> dict[str, list[tuple]]:
    queries = {
        "docs": "SELECT object_type, object_id, node_kind, partition, title, body, keywords::text, "
                "payload::text, attrs::text, source_updated_at, tf::text, tsv::text, len_title, len_body, "
                "deleted, pending_spaces, doc_hash, embed_hashes::text, pending_error, emb_local::text "
                "FROM {s}.docs ORDER BY object_type, object_id, node_kind",
        "changes": "SELECT seq, partition, object_type, object_id, node_kind, op, source_lsn::text "
                   "FROM {s}.changes ORDER BY seq",
        "source_rows": "SELECT relation, row_key, row_values::text, docs::text, lsn::text, deleted "
                       "FROM {s}.source_rows ORDER BY relation, row_key",
        "dead_letters": "SELECT source_lsn::text, relation, row_key, op, row_values::text, error "
                        "FROM {s}.dead_letters ORDER BY id",
        "checkpoints": "SELECT slot, lsn::text, partial_lsn::text, partial_offset, last_seq "
                       "FROM {s}.checkpoints",
    }
    with psycopg.connect(dsn) as conn:
        return {name: conn.execute(q.replace("{s}", schema)).fetchall() for name, q in queries.items()}


def make_applier(dsn: str, schema: str, map_items, dim: int = DIM) -> tuple[Applier, PostgresBackend]:
    """An applier for slot "slot" on a fresh `schema`, mapping public.items with `map_items`."""
    backend = PostgresBackend(dsn, schema=schema, spaces={"local": dim}, hnsw=False, cache_max_rows=0)
    state = WorkerState(schema)
    with psycopg.connect(dsn) as conn:
        state.migrate(conn)
    conn = backend.connect()
    state.claim_writer(conn, "slot")
    conn.commit()
    return Applier(conn, SearchIndex(backend, {"local": HashingEmbedder(dim)}), state,
                   {"public.items": map_items}.get, "slot",
                   read_conn=backend.connect(autocommit=True)), backend


def run(dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch, one_query: bool) -> list[str]:
    monkeypatch.setattr(apply_mod, "ONE_QUERY_MAX_ROWS", 16 if one_query else -1)
    applier, backend = make_applier(dsn, schema, mapper)
    sent: list[str] = []
    original = apply_mod.run_as_one_query

    def spy(c, statements):
        sent.append("one query")
        return original(c, statements)

    monkeypatch.setattr(apply_mod, "run_as_one_query", spy)
    try:
        for b in batches():
            applier.apply(b)
    finally:
        applier.close()
        backend.close()
    return sent


def test_one_query_apply_stores_exactly_what_the_statement_path_stores(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # every batch but the truncate's (it tombstones more rows than one query takes)
    assert run(pg_dsn, "one", monkeypatch, one_query=True) == ["one query"] * (len(batches()) - 1)
    assert run(pg_dsn, "many", monkeypatch, one_query=False) == []
    one, many = snapshot(pg_dsn, "one"), snapshot(pg_dsn, "many")
    for table in one:
        assert one[table] == many[table], table
    assert len(one["dead_letters"]) == 1 and "100% on purpose" in one["dead_letters"][0][5]
    live = [r for r in one["docs"] if not r[14]]
    assert [r[1] for r in live] == ["5"]  # the truncate took every row but the one after it
    # the vectors are the embedder's, bit for bit
    text = "after truncate\nback again"
    doc = IndexDoc("item", "5", title="after truncate", body="back again")
    assert doc.embed_text() == text
    expected = HashingEmbedder(DIM).embed([text])[0]
    stored = np.array(live[0][19].strip("[]").split(","), dtype=np.float32)
    assert stored.tobytes() == expected.tobytes()


def test_vector_text_reads_back_bit_identical() -> None:
    rng = np.random.default_rng(7)
    for scale in (1e-38, 1e-20, 1e-3, 1.0, 1e10, 1e37):
        v = (rng.standard_normal(64) * scale).astype(np.float32)
        v[0], v[1] = np.float32(-0.0), np.nextafter(np.float32(1), np.float32(2))
        back = np.array(vector_text(v).strip("[]").split(","), dtype=np.float32)
        assert back.tobytes() == v.tobytes()


def test_every_write_path_indexes_exactly_the_analysed_terms(pg_dsn: str) -> None:
    """The staged COPY takes a row's lexemes from its tf keys; the other paths send them."""
    from slipstream.index.analysis import analyze_doc

    backend = PostgresBackend(pg_dsn, schema="paths", spaces={"local": DIM}, hnsw=False)
    index = SearchIndex(backend, {"local": HashingEmbedder(DIM)})
    rng = np.random.default_rng(3)
    words = [w for t in TRICKY for w in t.split()] + ["running", "ran", "the", "ﬁsh"]

    def docs(prefix: str, n: int) -> list[IndexDoc]:
        return [IndexDoc("t", f"{prefix}{i}", title=" ".join(rng.choice(words, 4)),
                         body=" ".join(rng.choice(words, 30)), keywords=[str(rng.choice(words))],
                         partition="p") for i in range(n)]

    batches = {"copy": docs("c", 70), "statements": docs("s", 3)}
    assert len(batches["copy"]) >= apply_mod.COPY_THRESHOLD > len(batches["statements"])
    try:
        for batch in batches.values():
            index.upsert_many(batch)
        conn = backend.connect()
        for doc in batches["statements"]:  # and the one-query path
            doc = IndexDoc("t", "q" + doc.object_id, title=doc.title, body=doc.body, partition="p")
            batches.setdefault("one query", []).append(doc)
            run_as = apply_mod.run_as_one_query
            run_as(conn, backend.write_statements(index.prepare([doc])))
        conn.close()
        with psycopg.connect(pg_dsn) as c:
            for path, batch in batches.items():
                for doc in batch:
                    stored, expected = c.execute(
                        "SELECT d.tsv::text, array_to_tsvector(%s::text[])::text FROM paths.docs d "
                        "WHERE object_id = %s", (analyze_doc(doc).terms, doc.object_id)).fetchone()
                    assert stored == expected and expected, (path, doc.object_id)
    finally:
        backend.close()


def test_jsonb_parameters_mean_the_same_whichever_encoder_writes_them(pg_dsn: str) -> None:
    import json

    values = [{"tf": {"naïve": [1, 0], "日本": [0, 2], "it's": [3, 4]}}, ["a", "b\\c", "\"q\""],
              {"big": 2**70, "neg": -2**65}, {1: "int key", 2.5: "float key", False: "bool key", None: "null key"},
              {"nested": {"deep": [None, True, 1.5e300, -0.0, "🎉"]}}, [], {}]
    with psycopg.connect(pg_dsn) as conn:
        for value in values:
            fast = apply_mod.json_dumps(value)
            fast = fast.decode() if isinstance(fast, bytes) else fast
            same, = conn.execute("SELECT %s::jsonb = %s::jsonb", (fast, json.dumps(value))).fetchone()
            assert same, value
