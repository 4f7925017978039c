"""The apply pipeline's ordering, wake-ups and failure rules, with a recording applier."""

from __future__ import annotations

import select
import threading
import time

import pytest
from slipstream.worker.incoming import Batch, SourceChange, TxnEnd
from slipstream.worker.pipeline import ApplyPipeline, BatchDone, ChoreDone


class Recorder:
    """Stands in for the Applier: records the order of plans, commits and chores."""

    def __init__(self, commit_seconds: float = 0.0, fail_at: int | None = None) -> None:
        self.log: list[tuple[str, int]] = []
        self.threads: dict[str, set[str]] = {"plan": set(), "commit": set()}
        self.commit_seconds, self.fail_at = commit_seconds, fail_at
        self.lock = threading.Lock()

    def plan(self, batch: Batch) -> Batch:
        with self.lock:
            self.log.append(("plan", batch.completed[0].end_lsn))
            self.threads["plan"].add(threading.current_thread().name)
        return batch

    def commit(self, planned: Batch) -> object:
        lsn = planned.completed[0].end_lsn
        time.sleep(self.commit_seconds)
        if lsn == self.fail_at:
            raise RuntimeError(f"commit {lsn} failed")
        with self.lock:
            self.log.append(("commit", lsn))
            self.threads["commit"].add(threading.current_thread().name)
        return lsn


def batch(lsn: int, changes: int = 1) -> Batch:
    b = Batch()
    b.changes = [SourceChange("insert", "public.t", lsn, i, str(i)) for i in range(changes)]
    b.completed = [TxnEnd(lsn, lsn, 0.0)]
    return b


def collect_all(pipeline: ApplyPipeline, n: int, timeout: float = 10.0) -> list:
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        ready, _, _ = select.select([pipeline.fileno()], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no wake-up; got {len(out)} of {n}"
        out += pipeline.collect()
    return out


def test_results_come_back_typed_in_order_and_wake_the_reader() -> None:
    applier = Recorder(commit_seconds=0.01)
    pipeline = ApplyPipeline(applier)  # type: ignore[arg-type]
    try:
        for lsn in range(1, 9):
            pipeline.submit(batch(lsn, changes=100))  # large: committed on the committing thread
        done = collect_all(pipeline, 8)
    finally:
        pipeline.close()
    assert all(isinstance(d, BatchDone) for d in done)
    assert [d.result for d in done] == list(range(1, 9))
    assert [d.batch.completed[0].end_lsn for d in done] == list(range(1, 9))
    assert [lsn for kind, lsn in applier.log if kind == "commit"] == list(range(1, 9))
    assert applier.threads["commit"].isdisjoint(applier.threads["plan"])
    assert pipeline.idle


def test_a_small_batch_on_a_quiet_stream_commits_without_a_hand_off() -> None:
    applier = Recorder()
    pipeline = ApplyPipeline(applier)  # type: ignore[arg-type]
    try:
        pipeline.submit(batch(1))
        (done,) = collect_all(pipeline, 1)
    finally:
        pipeline.close()
    assert done.result == 1
    # nothing was outstanding: planned and committed on the submitting thread itself
    assert applier.threads["commit"] == applier.threads["plan"] == {threading.current_thread().name}


def test_a_small_batch_waits_for_outstanding_work_and_keeps_the_order() -> None:
    applier = Recorder(commit_seconds=0.02)
    pipeline = ApplyPipeline(applier)  # type: ignore[arg-type]
    try:
        pipeline.submit(batch(1, changes=100))  # large: the pipeline's threads
        pipeline.submit(batch(2))  # small, but 1 is outstanding: after it, not here
        pipeline.submit(batch(3))
        done = collect_all(pipeline, 3)
        pipeline.submit(batch(4))  # all collected: on this thread
        done += collect_all(pipeline, 1)
    finally:
        pipeline.close()
    assert [d.result for d in done] == [1, 2, 3, 4]
    assert [lsn for kind, lsn in applier.log if kind == "commit"] == [1, 2, 3, 4]
    assert threading.current_thread().name in applier.threads["commit"]
    assert len(applier.threads["commit"]) >= 2


def test_a_small_batch_failing_on_the_callers_thread_stops_everything_after_it() -> None:
    applier = Recorder(fail_at=1)
    pipeline = ApplyPipeline(applier)  # type: ignore[arg-type]
    try:
        pipeline.submit(batch(1))  # fails at once, on this thread
        pipeline.submit(batch(2, changes=100))
        pipeline.submit_chore("fill_pending", lambda: applier.log.append(("chore", 0)))
        time.sleep(0.05)
        with pytest.raises(RuntimeError, match="commit 1 failed"):
            collect_all(pipeline, 1)
    finally:
        pipeline.close()
    assert applier.log == [("plan", 1)]


def test_a_chore_runs_after_earlier_commits_and_before_later_plans() -> None:
    applier = Recorder(commit_seconds=0.02)
    pipeline = ApplyPipeline(applier)  # type: ignore[arg-type]

    def chore() -> str:
        with applier.lock:
            applier.log.append(("chore", 0))
        return "filled"

    try:
        pipeline.submit(batch(1, changes=100))
        pipeline.submit(batch(2, changes=100))
        pipeline.submit_chore("fill_pending", chore)
        pipeline.submit(batch(3, changes=100))
        done = collect_all(pipeline, 4)
    finally:
        pipeline.close()
    chores = [d for d in done if isinstance(d, ChoreDone)]
    assert chores == [ChoreDone("fill_pending", "filled")]
    at = applier.log.index(("chore", 0))
    assert {("commit", 1), ("commit", 2)} <= set(applier.log[:at])
    assert applier.log[at + 1:] == [("plan", 3), ("commit", 3)]


def test_a_failed_commit_is_raised_and_nothing_after_it_commits() -> None:
    applier = Recorder(commit_seconds=0.01, fail_at=2)
    pipeline = ApplyPipeline(applier)  # type: ignore[arg-type]
    try:
        for lsn in (1, 2, 3, 4):
            pipeline.submit(batch(lsn, changes=100))
        got: list = []
        with pytest.raises(RuntimeError, match="commit 2 failed"):
            for _ in range(50):  # at most ~5 s
                select.select([pipeline.fileno()], [], [], 0.1)
                got += pipeline.collect()
    finally:
        pipeline.close()
    assert [d.result for d in got] == [1]
    assert [lsn for kind, lsn in applier.log if kind == "commit"] == [1]
