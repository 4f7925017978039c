"""The apply pipeline: plan the next batch while the previous one commits.

Planning (mapping, embedding: Python work) and committing (the search database's
work) overlap, which on a small machine is most of the difference between applying
at the speed of Python and at the speed of the database. One thread plans, one
commits (a small batch with nothing else waiting to be planned is committed by the
planning thread itself, sparing a hand-off); commits happen strictly in submission order. Chores (backfill chunks,
pending embeddings) run on the planning thread after every earlier commit and before
any later batch is planned, so change-log sequence numbers keep the single-writer order.

The pipeline does not bound itself: the caller (the stream runner's `Batcher`) keeps
at most a few items in flight. Every finished item is announced on a pipe, whose read
end (`fileno()`) the runner polls together with the replication socket, so the
reader sleeps until either has something for it.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .apply import Applier, ApplyResult
from .incoming import Batch


@dataclass(frozen=True, slots=True)
class BatchDone:
    """A batch committed: its result (the checkpoint it made durable) and the batch."""

    result: ApplyResult
    batch: Batch


@dataclass(frozen=True, slots=True)
class ChoreDone:
    """A chore returned `value`; `name` is what the caller called it."""

    name: str
    value: Any


PipelineResult = BatchDone | ChoreDone


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


@dataclass(frozen=True, slots=True)
class _Committed:
    future: Future[ApplyResult]
    batch: Batch


@dataclass(frozen=True, slots=True)
class _Chore:
    name: str
    run: Callable[[], Any]


_STOP = object()
INLINE_COMMIT_MAX = 32  # changes; a larger batch always commits on the committing thread


class ApplyPipeline:
    def __init__(self, applier: Applier) -> None:
        self.applier = applier
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[_Committed | ChoreDone | _Failed] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slipstream-commit")
        self._outstanding = 0  # submitted and not yet collected
        self._broken = False  # a batch failed on the caller's thread
        self._thread = threading.Thread(target=self._run, name="slipstream-plan", daemon=True)
        self._thread.start()

    @property
    def idle(self) -> bool:
        """Nothing submitted is still waiting to be collected."""
        return self._outstanding == 0

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def fileno(self) -> int:
        """Readable when finished work (or a failure) is waiting to be collected."""
        return self._wake_r

    def submit(self, batch: Batch) -> None:
        """Plan and commit `batch` after everything submitted before it.

        With nothing outstanding, a small batch is planned and committed at once on the
        caller's thread: on a quiet stream that spares two thread wake-ups, which on a
        busy machine cost more than the work. Its result is collected like any other.
        """
        if self._broken:
            return  # a commit failed: nothing after it may commit (collect() raises it)
        self._outstanding += 1
        if self._outstanding == 1 and len(batch.changes) <= INLINE_COMMIT_MAX:
            done: Future[ApplyResult] = Future()
            try:
                done.set_result(self.applier.commit(self.applier.plan(batch)))
            except Exception as exc:  # noqa: BLE001 - reported through collect()
                self._broken = True
                self._announce(_Failed(exc))
                return
            self._announce(_Committed(done, batch))
            return
        self._inbox.put(batch)

    def submit_chore(self, name: str, run: Callable[[], Any]) -> None:
        """Run `run()` alone on the writer, after every earlier commit."""
        if self._broken:
            return
        self._inbox.put(_Chore(name, run))
        self._outstanding += 1

    def collect(self) -> list[PipelineResult]:
        """Finished work, oldest first, without waiting. Re-raises the first failure (the
        batch's transaction rolled back; nothing after it was committed)."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass  # drained; anything announced from now on is picked up below or next time
        out: list[PipelineResult] = []
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return out
            self._outstanding -= 1
            if isinstance(item, _Failed):
                raise item.error
            if isinstance(item, _Committed):
                out.append(BatchDone(item.future.result(), item.batch))
            else:
                out.append(item)

    def close(self) -> None:
        """Finish what was submitted (results stay collectable), then stop the threads."""
        self._inbox.put(_STOP)
        self._thread.join()
        self._committer.shutdown(wait=True)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the planning thread --------------------------------------------------------------

    def _announce(self, item: _Committed | ChoreDone | _Failed) -> None:
        self._outbox.put(item)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def _run(self) -> None:
        applier = self.applier
        prev: Future[ApplyResult] | None = None
        while True:
            item = self._inbox.get()
            if item is _STOP:
                return
            try:
                if isinstance(item, _Chore):
                    if prev is not None and prev.exception() is not None:
                        return  # a commit failed (already reported): nothing after it may commit
                    prev = None  # chores run alone, after every commit
                    self._announce(ChoreDone(item.name, item.run()))
                    continue
                planned = applier.plan(item)  # overlaps the previous commit
                if prev is not None and prev.exception() is not None:
                    return  # commits stay in order; never commit past a failed one
                if self._inbox.empty() and len(item.changes) <= INLINE_COMMIT_MAX:
                    # A small batch and nothing to plan meanwhile (a quiet stream): commit
                    # here and spare the hand-off. A backlog comes in large batches, whose
                    # commits overlap the next plan on the committing thread.
                    prev = Future()
                    try:
                        prev.set_result(applier.commit(planned))
                    except Exception as exc:  # noqa: BLE001 - reported through collect()
                        prev.set_exception(exc)
                    self._announce(_Committed(prev, item))
                    continue
                prev = self._committer.submit(applier.commit, planned)
                prev.add_done_callback(lambda f, b=item: self._announce(_Committed(f, b)))
            except BaseException as exc:  # noqa: BLE001 - handed to the stream loop
                self._announce(_Failed(exc))
                return


__all__ = ["ApplyPipeline", "ApplyResult", "BatchDone", "ChoreDone", "PipelineResult"]
