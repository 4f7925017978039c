"""The Batcher from events alone: batch cuts, back-pressure, chores, acknowledgements, stop."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from slipstream.worker.batcher import (
    Applied,
    Batcher,
    BatcherSettings,
    ChoreFinished,
    Drained,
    Flush,
    KeepaliveReceived,
    Received,
    RunChore,
    SendStatus,
    Stopped,
    StopRequested,
    Submit,
    Tick,
    Wait,
)
from slipstream.worker.incoming import SourceChange, TxnEnd

S = BatcherSettings(max_changes=10, max_bytes=10**9, max_seconds=0.25, max_in_flight=2,
                    status_interval=10.0, pending_interval=5.0, chore_every=3)


def change(lsn: int, i: int = 0) -> SourceChange:
    return SourceChange("insert", "public.t", lsn, index=i, key=f"[{lsn},{i}]", values={"id": str(lsn)})


def txn(lsn: int, n: int = 1) -> list:
    return [change(lsn, i) for i in range(n)] + [TxnEnd(lsn, lsn + 8, 0.0)]


def of(actions: list, kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def last_wait(actions: list) -> Wait:
    assert isinstance(actions[-1], Wait), actions
    return actions[-1]


def test_quiet_stream_between_transactions_cuts_at_once() -> None:
    b = Batcher(S, now=0.0)
    out = b.send(Received(1.0, txn(100)))
    assert not of(out, Submit)  # more may be buffered: wait for the reader to drain
    out = b.send(Drained(1.001))
    (submit,) = of(out, Submit)
    assert [c.commit_lsn for c in submit.batch.changes] == [100]
    assert submit.batch.partial is None and len(submit.batch.completed) == 1


def test_quiet_mid_transaction_waits_for_the_commit_or_the_deadline() -> None:
    b = Batcher(S, now=0.0)
    b.send(Received(1.0, [change(100, 0)], in_transaction=True, partial=(100, 1)))
    out = b.send(Drained(1.0))
    assert not of(out, Submit)
    assert last_wait(out).until == pytest.approx(1.25)  # max_seconds after it opened
    out = b.send(Tick(1.25))
    (submit,) = of(out, Submit)
    assert submit.batch.partial == (100, 1)  # cut inside a transaction: resume point recorded


def test_batch_due_while_pipeline_busy_waits_without_spinning_then_goes_out() -> None:
    b = Batcher(S, now=0.0)
    for lsn in (100, 200):  # two batches fill the pipeline's two slots
        b.send(Received(1.0, txn(lsn)))
        assert of(b.send(Drained(1.0)), Submit)
    b.send(Received(1.1, txn(300)))
    out = b.send(Drained(1.1))
    assert not of(out, Submit)
    now = 1.1
    for _ in range(50):  # the batch is long overdue; every wait still lies in the future
        now += 0.3
        out = b.send(Tick(now))
        wait = last_wait(out)
        assert not of(out, Submit)
        assert wait.read  # not full: keep reading while the pipeline is busy
        assert wait.until is None or wait.until > now
    out = b.send(Applied(now + 0.01, 108))
    assert of(out, Flush) == [Flush(108)]
    (submit,) = of(out, Submit)
    assert [c.commit_lsn for c in submit.batch.changes] == [300]


def test_pipeline_busy_for_long_stops_reading_and_keeps_the_walsender_alive() -> None:
    b = Batcher(S, now=0.0)
    for lsn in (100, 200):
        b.send(Received(0.1, txn(lsn)))
        b.send(Drained(0.1))
    out = b.send(Received(0.2, txn(300, n=S.max_changes)))
    wait = last_wait(out)
    assert not wait.read  # full: back-pressure lands on the WAL
    statuses = 0
    now = 0.2
    while now < 120.0:  # two minutes without the pipeline finishing anything
        assert wait.until is not None and wait.until > now
        now = wait.until
        out = b.send(Tick(now))
        statuses += len(of(out, SendStatus))
        wait = last_wait(out)
        assert not wait.read and not of(out, Submit)
    assert statuses >= 120.0 / (S.status_interval / 2) - 1
    out = b.send(Applied(now, 108))
    (submit,) = of(out, Submit)
    assert len(submit.batch.changes) == S.max_changes
    assert last_wait(out).read


def test_keepalives_advance_the_flush_lsn_only_when_nothing_is_pending() -> None:
    b = Batcher(S, now=0.0, flushed=50)
    assert of(b.send(KeepaliveReceived(0.1, 80)), Flush) == [Flush(80)]
    assert of(b.send(KeepaliveReceived(0.2, 70)), Flush) == []  # never backwards
    b.send(Received(0.3, [change(100)], in_transaction=True, partial=(100, 1)))
    assert of(b.send(KeepaliveReceived(0.3, 500)), Flush) == []  # a batch is open
    b.send(Received(0.4, [TxnEnd(100, 108, 0.0)]))
    assert of(b.send(Drained(0.4)), Submit)
    assert of(b.send(KeepaliveReceived(0.5, 500)), Flush) == []  # still in flight
    assert of(b.send(Applied(0.6, 108)), Flush) == [Flush(108)]
    assert of(b.send(KeepaliveReceived(0.7, 500)), Flush) == [Flush(500)]
    assert b.flushed == 500
    assert of(b.send(Tick(6.0)), RunChore) == [RunChore("fill_pending")]
    assert of(b.send(KeepaliveReceived(6.1, 600)), Flush) == []  # a chore is running
    assert of(b.send(ChoreFinished(6.2, "fill_pending")), Flush) == []
    assert of(b.send(KeepaliveReceived(6.3, 600)), Flush) == [Flush(600)]


def test_keepalive_while_blocked_never_acknowledges_uncommitted_work() -> None:
    b = Batcher(S, now=0.0)
    for lsn in (100, 200):
        b.send(Received(0.1, txn(lsn)))
        b.send(Drained(0.1))
    b.send(Received(0.2, txn(300, n=S.max_changes)))  # full, reading stopped
    for t in range(1, 30):
        out = b.send(KeepaliveReceived(float(t), 10_000))
        assert not of(out, Flush)
    assert [a.lsn for a in of(b.send(Applied(31.0, 208)), Flush)] == [208]


def test_chores_get_a_turn_under_sustained_load() -> None:
    """Regression: pending embeddings were filled only when the pipeline was idle and no
    batch was open, so under a steady stream they never were."""
    b = Batcher(S, now=0.0)
    runs, oldest = [], []
    now, lsn = 0.0, 100
    for _ in range(400):  # 20 s of a stream that keeps the pipeline full
        now += 0.05
        lsn += 100
        out = b.send(Received(now, txn(lsn)))
        out += b.send(Drained(now))
        oldest += [a.batch.completed[-1].end_lsn for a in of(out, Submit)]
        assert b.in_flight >= 1  # the pipeline never idles
        if b.in_flight == S.max_in_flight and b.batches_in_flight:
            out += b.send(Applied(now, oldest.pop(0)))
            oldest += [a.batch.completed[-1].end_lsn for a in of(out, Submit)]
        for chore in of(out, RunChore):
            runs.append((now, chore.kind))
            b.send(ChoreFinished(now, chore.kind))
    assert [k for _, k in runs] == ["fill_pending"] * len(runs)
    assert len(runs) >= 3  # one every pending_interval (5 s), late by a few batches at most
    gaps = [b2 - a for (a, _), (b2, _) in itertools.pairwise(runs)]
    assert all(g < S.pending_interval + 1.0 for g in gaps)


def test_compaction_runs_on_its_interval_idle_and_under_load() -> None:
    settings = BatcherSettings(**{**{f: getattr(S, f) for f in S.__slots__},
                                  "compact_interval": 7.0, "pending_interval": 100.0,
                                  "status_interval": 100.0})
    b = Batcher(settings, now=0.0)
    assert last_wait(b.send(Tick(0.0))).until == 7.0  # an idle worker wakes for it
    assert of(b.send(Tick(6.9)), RunChore) == []
    assert of(b.send(Tick(7.0)), RunChore) == [RunChore("compact")]
    assert of(b.send(Tick(8.0)), RunChore) == []  # one at a time
    b.send(ChoreFinished(8.0, "compact"))
    runs, oldest, now, lsn = [], [], 8.0, 100
    for _ in range(300):  # 15 s of a stream that keeps the pipeline full
        now += 0.05
        lsn += 100
        out = b.send(Received(now, txn(lsn))) + b.send(Drained(now))
        oldest += [a.batch.completed[-1].end_lsn for a in of(out, Submit)]
        if b.in_flight == settings.max_in_flight and b.batches_in_flight:
            out += b.send(Applied(now, oldest.pop(0)))
            oldest += [a.batch.completed[-1].end_lsn for a in of(out, Submit)]
        for chore in of(out, RunChore):
            runs.append((now, chore.kind))
            b.send(ChoreFinished(now, chore.kind))
    assert [k for _, k in runs] == ["compact", "compact"], runs  # at ~14 s and ~21 s
    assert all(abs(t - due) < 1.0 for (t, _), due in zip(runs, (14.0, 21.0), strict=True)), runs


def test_no_compaction_without_an_interval() -> None:
    b = Batcher(S, now=0.0)
    for t in range(1, 100):
        assert "compact" not in [c.kind for c in of(b.send(Tick(float(t))), RunChore)]
        for c in b.chore_in_flight and [b.chore_in_flight] or []:
            b.send(ChoreFinished(float(t), c))


def test_backfill_runs_back_to_back_when_idle_and_between_batches_under_load() -> None:
    b = Batcher(S, now=0.0, backfill=True)
    out = b.send(Tick(0.0))
    assert of(out, RunChore) == [RunChore("backfill")]
    out = b.send(ChoreFinished(0.1, "backfill"))
    assert of(out, RunChore) == [RunChore("backfill")]  # idle: the next chunk at once
    # Load arrives: batches go out next to the chore, and the chore keeps its turn.
    kinds = []
    now, lsn = 0.2, 100
    for _ in range(12):
        now += 0.01
        lsn += 100
        out = b.send(Received(now, txn(lsn)))
        out += b.send(Drained(now))
        if b.chore_in_flight:
            out += b.send(ChoreFinished(now, "backfill"))
        if b.batches_in_flight:
            out += b.send(Applied(now, lsn + 8))
        kinds += [type(a).__name__ for a in out if isinstance(a, (Submit, RunChore))]
    assert kinds.count("Submit") == 12
    assert kinds.count("RunChore") >= 3
    out = b.send(ChoreFinished(now, "backfill", exhausted=True)) if b.chore_in_flight else []
    assert not b.backfill or of(out, RunChore) == []


def test_stop_drains_what_is_in_flight_then_stops() -> None:
    b = Batcher(S, now=0.0)
    b.send(Received(0.1, txn(100)))
    b.send(Drained(0.1))
    b.send(Received(0.2, [change(200)], in_transaction=True, partial=(200, 1)))
    out = b.send(StopRequested(0.3))
    assert not of(out, Submit)
    assert not last_wait(out).read  # nothing more is read
    out = b.send(Tick(10.0))
    assert not of(out, Stopped)
    out = b.send(Applied(10.1, 108))
    assert of(out, Flush) == [Flush(108)]
    assert isinstance(out[-1], Stopped) and out[-1].abandoned_changes == 1
    assert of(out, SendStatus)
    with pytest.raises(RuntimeError):
        b.send(Tick(11.0))


events = st.one_of(
    st.builds(lambda n, tx: ("rx", n, tx), st.integers(1, 12), st.booleans()),
    st.just(("drained",)),
    st.just(("keepalive",)),
    st.just(("applied",)),
    st.just(("chore_done",)),
    st.floats(0.0, 3.0).map(lambda dt: ("tick", dt)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=80), st.booleans())
def test_invariants_over_any_event_sequence(script: list, backfill: bool) -> None:
    """Whatever happens: no deadline in the past (so no spin), the pipeline never holds
    more than max_in_flight, the flush LSN only moves forward."""
    b = Batcher(S, now=0.0, backfill=backfill)
    now, lsn, in_flight, chore, committed = 0.0, 100, [], None, 0
    flushes = []
    for ev in script:
        now += 0.001
        match ev:
            case ("rx", n, in_tx):
                lsn += 100
                items = [change(lsn, i) for i in range(n)] + ([] if in_tx else [TxnEnd(lsn, lsn + 8, 0.0)])
                out = b.send(Received(now, items, in_tx, (lsn, n) if in_tx else None))
            case ("drained",):
                out = b.send(Drained(now))
            case ("keepalive",):
                out = b.send(KeepaliveReceived(now, lsn + 8 if not b.batch and not in_flight else 0))
            case ("applied",) if in_flight:
                done = in_flight.pop(0)
                committed = max(committed, done)
                out = b.send(Applied(now, done))
            case ("chore_done",) if chore:
                out = b.send(ChoreFinished(now, chore))
                chore = None
            case ("tick", dt):
                now += dt
                out = b.send(Tick(now))
            case _:
                continue
        for a in out:
            if isinstance(a, Submit):
                in_flight.append(a.batch.completed[-1].end_lsn if a.batch.completed else b.flushed)
            elif isinstance(a, RunChore):
                assert chore is None
                chore = a.kind
            elif isinstance(a, Flush):
                flushes.append(a.lsn)
        assert len(in_flight) + (chore is not None) <= S.max_in_flight
        wait = last_wait(out)
        assert wait.until is None or wait.until > now
        assert wait.read == (not b.full)
    assert flushes == sorted(flushes) and len(set(flushes)) == len(flushes)
