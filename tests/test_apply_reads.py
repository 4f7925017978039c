"""Planning reads a batch's source states and the stored state of the search rows it makes
in one round trip, mapping each row once.

The rows of a batch that carry every column are mapped before the states are read, so
both reads go out together. These tests pin that: the reads per planned batch, the
mapper calls per change, and that the tables end exactly as when every row is mapped
after the read (the order the apply transaction used to take).
"""

from __future__ import annotations

from collections.abc import Mapping

import psycopg
import pytest
from slipstream.index import IndexDoc, pg_embedding
from slipstream.index.pg_embedding import FEW_KEYS
from slipstream.worker import state as state_mod
from slipstream.worker.apply import Applier, read_as_one_query
from slipstream.worker.incoming import Batch, SourceChange, TxnEnd
from slipstream.worker.pgoutput import UNCHANGED

from .test_apply_one_query import TRICKY, make_applier, snapshot

DIM = 32
COLUMNS = (("id", 23), ("title", 25), ("body", 25))
calls: list[str] = []


def mapper(row: Mapping[str, object], op: str) -> list[IndexDoc]:
    calls.append(str(row["id"]))
    if row["title"] == "boom":
        raise RuntimeError("mapper exploded on purpose")
    # Keys and partitions from free text: the one-query read binds them as literals.
    n = int(str(row["id"]))
    return [IndexDoc("item", f"{TRICKY[n % len(TRICKY)]}#{n}", title=str(row["title"]),
                     body=str(row["body"]), partition=TRICKY[(n + 1) % len(TRICKY)] or "-")]


def change(kind: str, lsn: int, i: int, title: str, body: object) -> SourceChange:
    return SourceChange(kind, "public.items", lsn, 0, f"[{i}]",
                        {"id": str(i), "title": title, "body": body}, COLUMNS)


def script() -> list[list[SourceChange]]:
    lsn = 0x2000000
    out = [[change("insert", lsn + 10 * i, i, f"title {i}", f"body {TRICKY[i]}") for i in range(len(TRICKY))]]
    lsn += 1000
    out.append([change("update", lsn, 1, "title 1", "new body"),  # text changed
                change("update", lsn, 2, "title 2", UNCHANGED),  # body from the stored state
                change("update", lsn, 3, "title 3", f"body {TRICKY[3]}"),  # identical: no write
                change("insert", lsn, 50, "boom", "a dead letter"),
                SourceChange("delete", "public.items", lsn, 0, "[4]")])
    lsn += 1000
    out.append([change("insert", lsn, 4, "back", "again"), change("update", lsn, 4, "back", "twice")])
    return out


def run(dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch, premap: bool
        ) -> tuple[list[int], list[int]]:
    """Apply the script; (reads on the planning connection, pooled stored-state reads) per batch."""
    if not premap:
        monkeypatch.setattr(Applier, "_premap", lambda self, changes: {})
    applier, backend = make_applier(dsn, schema, mapper, DIM)
    read_conn = applier.read_conn
    reads, pooled = [], []
    counted = {"reads": 0, "pooled": 0}
    execute, stored_state = read_conn.execute, backend.stored_state

    def counting_execute(*args, **kw):
        counted["reads"] += 1
        return execute(*args, **kw)

    def counting_stored_state(keys):
        counted["pooled"] += 1
        return stored_state(keys)

    monkeypatch.setattr(read_conn, "execute", counting_execute)
    monkeypatch.setattr(backend, "stored_state", counting_stored_state)
    try:
        for changes in script():
            b = Batch(changes=changes)
            b.completed.append(TxnEnd(changes[0].commit_lsn, changes[-1].commit_lsn + 5, 0.0))
            counted.update(reads=0, pooled=0)
            applier.apply(b)
            reads.append(counted["reads"])
            pooled.append(counted["pooled"])
    finally:
        applier.close()
        backend.close()
    return reads, pooled


def test_planning_reads_states_once_and_maps_each_row_once(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls.clear()
    reads, pooled = run(pg_dsn, "premapped", monkeypatch, premap=True)
    # One round trip per batch for every state planning needs. The second batch has a row
    # whose body is completed from its stored state, so its search row is read after.
    assert reads == [1, 1, 1]
    assert pooled == [0, 1, 0]
    upserts = [c for changes in script() for c in changes if c.kind != "delete"]
    assert sorted(calls) == sorted(c.values["id"] for c in upserts)  # once per change, no more
    monkeypatch.undo()
    calls.clear()
    reads_after, pooled_after = run(pg_dsn, "mapped_after", monkeypatch, premap=False)
    assert reads_after == [1, 1, 1] and pooled_after == [1, 1, 1]  # the search rows apart
    ours, theirs = snapshot(pg_dsn, "premapped"), snapshot(pg_dsn, "mapped_after")
    for table in ours:
        assert ours[table] == theirs[table], table
    dead = {r[2]: r[5] for r in ours["dead_letters"]}
    assert "on purpose" in dead.pop("[50]")
    assert not dead
    live = {r[1] for r in ours["docs"] if not r[14]}
    assert f"{TRICKY[2]}#2" in live and f"{TRICKY[4]}#4" in live and f"{TRICKY[50 % len(TRICKY)]}#50" not in live


def test_read_as_one_query_answers_each_statement_in_order(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        got = read_as_one_query(conn, [
            (b"SELECT x FROM unnest(%s::text[]) AS x ORDER BY x COLLATE \"C\"", [TRICKY]),
            (b"SELECT %s::int + 1 WHERE false", [1]),
            (b"SELECT %s::text, %s::int", ["it's", 7])])
    assert got == [[(t,) for t in sorted(TRICKY)], [], [("it's", 7)]]
    with psycopg.connect(pg_dsn, autocommit=True) as conn, pytest.raises(ValueError, match="placeholders"):
        read_as_one_query(conn, [(b"SELECT %s, %s", [1])])


def test_a_batch_committing_while_the_next_is_planned_is_seen_by_it(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins a race: batch B (the row filtered out: a tombstone) commits after C, which
    brings the row back exactly as it was first written, has read the tables but before
    it compares its rows with the batches still in flight. C must still see B, or it
    takes its row for unchanged, writes nothing, and the row stays deleted."""

    def open_only(row: Mapping[str, object], op: str) -> list[IndexDoc]:
        if row["body"] == "closed":
            return []
        return [IndexDoc("item", str(row["id"]), title=str(row["title"]), body=str(row["body"]),
                         partition="p")]

    applier, backend = make_applier(pg_dsn, "race", open_only, DIM)

    def batch(lsn: int, body: str) -> Batch:
        b = Batch(changes=[change("update" if lsn > 1 else "insert", lsn, 7, "title", body)])
        b.completed.append(TxnEnd(lsn, lsn + 1, 0.0))
        return b

    try:
        applier.apply(batch(1, "open"))
        planned_b = applier.plan(batch(2, "closed"))
        read_states = applier._read_states

        def read_then_commit_b(*args):
            out = read_states(*args)
            applier.commit(planned_b)  # B lands between C's read and its comparison
            return out

        monkeypatch.setattr(applier, "_read_states", read_then_commit_b)
        applier.commit(applier.plan(batch(3, "open")))
        with psycopg.connect(pg_dsn) as conn:
            row = conn.execute("SELECT deleted, body FROM race.docs WHERE object_id = '7'").fetchone()
        assert row == (False, "open")
    finally:
        applier.close()
        backend.close()


@pytest.mark.parametrize("count", [1, 2, FEW_KEYS, FEW_KEYS + 1, 40])
def test_a_few_keys_as_rows_read_what_arrays_read(pg_dsn: str, monkeypatch: pytest.MonkeyPatch,
                                                  count: int) -> None:
    """Up to FEW_KEYS keys, the state reads send a list of rows instead of arrays: the same
    rows come back, for keys present and absent, with quotes, backslashes and non-ASCII
    text in them, through the one-query read and the parameterised one."""
    schema = f"few_keys_{count}"
    applier, backend = make_applier(pg_dsn, schema, mapper, DIM)
    try:
        for changes in script():
            b = Batch(changes=changes)
            b.completed.append(TxnEnd(changes[0].commit_lsn, changes[-1].commit_lsn + 5, 0.0))
            applier.apply(b)
        present = [("item", f"{TRICKY[n % len(TRICKY)]}#{n}", "leaf") for n in range(len(TRICKY))]
        absent = [("item", f"{t} (absent {i})", "leaf") for i, t in enumerate(TRICKY * 4)]
        doc_keys = (present + absent)[:count][::-1]
        source_keys = ([("public.items", f"[{i}]") for i in range(len(TRICKY))]
                       + [("public.items", f"[{t}]") for t in TRICKY * 4])[:count]
        state, conn = applier.state, applier.read_conn

        def read() -> tuple[dict, dict]:
            stored_q, source_q = backend.stored_state_query(doc_keys), state.source_rows_query(source_keys)
            one = read_as_one_query(conn, [stored_q, source_q])
            assert conn.execute(*stored_q).fetchall() == one[0]  # server-side parameters alike
            return backend.stored_state_rows(one[0]), state.source_rows_parse(one[1])

        few = read()
        shapes = {b"unnest" in backend.stored_state_query(doc_keys)[0],
                  b"unnest" in state.source_rows_query(source_keys)[0]}
        assert shapes == {count > FEW_KEYS}
        monkeypatch.setattr(pg_embedding, "FEW_KEYS", 0)
        monkeypatch.setattr(state_mod, "FEW_KEYS", 0)
        assert read() == few
        assert len(few[0]) == sum(k in present for k in doc_keys) > 0
        assert len(few[1]) == min(count, len(TRICKY))
    finally:
        applier.close()
        backend.close()
