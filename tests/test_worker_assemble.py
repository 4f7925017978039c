"""TxnAssembler from events alone: numbering, and what the checkpoint makes it skip."""

from datetime import UTC, datetime

import pytest
from slipstream.worker.assemble import TxnAssembler
from slipstream.worker.errors import TableRenamedError
from slipstream.worker.incoming import SourceChange, TxnEnd
from slipstream.worker.pgoutput import (
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Relation,
    Truncate,
    Update,
)
from slipstream.worker.state import Checkpoint

TS = datetime(2026, 1, 1, tzinfo=UTC)
REL = Relation(16384, "public", "notes", "d",
               (Column(1, "id", 23, -1), Column(0, "title", 25, -1)))


def txn(final_lsn: int, n: int) -> list:
    events = [Begin(final_lsn, TS, 7), REL]
    events += [Insert(16384, (str(i), f"t{i}")) for i in range(n)]
    events.append(Commit(0, final_lsn, final_lsn + 8, TS))
    return events


def run(cp: Checkpoint, *txns: list) -> list:
    a = TxnAssembler(cp)
    out = []
    for events in txns:
        for e in events:
            out += a.feed(e)
    return out


def test_changes_are_numbered_within_their_transaction() -> None:
    out = run(Checkpoint(0, None, 0, 0), txn(100, 3))
    changes = [c for c in out if isinstance(c, SourceChange)]
    assert [(c.index, c.key, c.values["title"], c.commit_lsn) for c in changes] == [
        (0, '["0"]', "t0", 100), (1, '["1"]', "t1", 100), (2, '["2"]', "t2", 100)]
    assert out[-1] == TxnEnd(100, 108, TS.timestamp())


def test_transactions_committed_before_the_checkpoint_are_skipped() -> None:
    out = run(Checkpoint(200, None, 0, 0), txn(100, 2), txn(199, 1), txn(200, 1))
    assert [(c.commit_lsn, c.index) for c in out if isinstance(c, SourceChange)] == [(200, 0)]
    assert [e.commit_lsn for e in out if isinstance(e, TxnEnd)] == [200]


def test_a_partly_applied_transaction_resumes_after_its_last_durable_change() -> None:
    out = run(Checkpoint(50, 100, 2, 0), txn(100, 5))
    assert [c.index for c in out if isinstance(c, SourceChange)] == [2, 3, 4]


def test_update_delete_and_truncate_carry_keys() -> None:
    a = TxnAssembler(Checkpoint(0, None, 0, 0))
    a.feed(Begin(100, TS, 1))
    a.feed(REL)
    (upd,) = a.feed(Update(16384, ("1", "old"), "K", ("2", "new")))
    assert (upd.kind, upd.key, upd.old_key) == ("update", '["2"]', '["1"]')
    (dele,) = a.feed(Delete(16384, ("3", None), "K"))
    assert (dele.kind, dele.key) == ("delete", '["3"]')
    (trunc,) = a.feed(Truncate((16384,), False, False))
    assert trunc.truncated == ("public.notes",)


def test_tables_outside_the_config_are_ignored() -> None:
    a = TxnAssembler(Checkpoint(0, None, 0, 0), tables={"public.other"})
    out = [x for e in txn(100, 2) for x in a.feed(e)]
    assert [type(x) for x in out] == [TxnEnd]


def test_a_tuple_with_the_wrong_column_count_is_a_typed_error_in_the_stream_path() -> None:
    """Regression: the stream's row path raised a bare ValueError from zip(strict=True)."""
    import pytest
    from slipstream.index.errors import SlipstreamError
    from slipstream.worker.errors import classify
    from slipstream.worker.relations import TupleShapeError

    a = TxnAssembler(Checkpoint(0, None, 0, 0))
    a.feed(Begin(100, TS, 7))
    a.feed(REL)
    with pytest.raises(TupleShapeError, match="public.notes has 3 columns, its Relation message has 2"):
        a.feed(Insert(16384, ("1", "t", "extra")))
    with pytest.raises(TupleShapeError):
        a.feed(Delete(16384, "O", ("1",)))
    assert issubclass(TupleShapeError, SlipstreamError)
    assert classify(TupleShapeError("x")) == "stop"


def test_a_configured_table_renamed_under_the_worker_stops_it_with_both_names() -> None:
    """Its changes would otherwise arrive under a name no mapper is registered for and be
    dropped unseen; a new shape under the same name, or a rename between two configured
    names, carries on."""
    a = TxnAssembler(Checkpoint(0, None, 0, 0), tables=["public.notes", "public.notes_v2"])
    for event in txn(100, 1):
        a.feed(event)
    widened = Relation(16384, "public", "notes", "d", REL.columns + (Column(0, "body", 25, -1),))
    assert a.feed(widened) == []
    assert a.feed(Relation(16384, "public", "notes_v2", "d", widened.columns)) == []
    with pytest.raises(TableRenamedError, match=r"table 'public.notes_v2' was renamed to "
                                                r"'archive.notes' .*\[tables\.\"archive\.notes\"\]"):
        a.feed(Relation(16384, "archive", "notes", "d", widened.columns))
    other = TxnAssembler(Checkpoint(0, None, 0, 0), tables=["public.todo"])
    other.feed(REL)
    assert other.feed(Relation(16384, "public", "renamed", "d", REL.columns)) == []  # not ours


def test_changes_under_a_configured_name_but_a_dropped_tables_oid_are_skipped() -> None:
    """A table replaced under its name leaves the old table's changes in the slot; they
    belong to a table that no longer exists and must not reach the new one's documents."""
    a = TxnAssembler(Checkpoint(0, None, 0, 0), tables=["public.notes"], oids={"public.notes": 20000})
    new = Relation(20000, "public", "notes", "d", REL.columns)
    events = [Begin(100, TS, 7), REL, Insert(16384, ("1", "old table")), Truncate((16384,), False, False),
              new, Insert(20000, ("1", "new table")), Truncate((20000,), False, False), Commit(0, 100, 108, TS)]
    out = [c for e in events for c in a.feed(e) if isinstance(c, SourceChange)]
    assert [(c.kind, c.values and c.values["title"]) for c in out] == [("insert", "new table"), ("truncate", None)]
