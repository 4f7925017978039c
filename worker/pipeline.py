"""The apply pipeline: plan the next batch while the previous one commits.

Planning (mapping, embedding: Python work) and committing (the search database's
work) overlap, which on a small machine is most of the difference between applying
at the speed of Python and at the speed of the database. At most one batch is being
planned, one is waiting, and one is committing; `submit` refuses more, which is how
back-pressure reaches the stream reader. Commits happen strictly in order. Chores
(backfill chunks, pending embeddings) run between commits, alone, on the same
writer, so change-log sequence numbers keep the single-writer order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .apply import Applier, ApplyResult
from .changes import Batch

_STOP = object()


class ApplyPipeline:
    def __init__(self, applier: Applier) -> None:
        self.applier = applier
        self._inbox: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._outbox: queue.Queue[tuple] = queue.Queue()
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slipstream-commit")
        self._outstanding = 0  # submitted and not yet collected
        self._thread = threading.Thread(target=self._run, name="slipstream-plan", daemon=True)
        self._thread.start()

    @property
    def idle(self) -> bool:
        """Nothing submitted is still waiting to be collected."""
        return self._outstanding == 0

    def submit(self, item: Batch | Callable[[], Any], timeout: float = 0.0) -> bool:
        """Queue a batch (or a chore); False when the pipeline is full."""
        try:
            self._inbox.put(item, timeout=timeout) if timeout > 0 else self._inbox.put_nowait(item)
        except queue.Full:
            return False
        self._outstanding += 1
        return True

    def collect(self, timeout: float = 0.0) -> list[tuple[str, Any, Any]]:
        """Finished work, oldest first: ("batch", ApplyResult, Batch) or ("chore", value, None).

        Re-raises the first failure (the batch's transaction rolled back).
        """
        out = []
        block = timeout > 0
        while True:
            try:
                kind, value, extra = self._outbox.get(timeout=timeout) if block else self._outbox.get_nowait()
            except queue.Empty:
                return out
            block = False
            self._outstanding -= 1
            if kind == "error":
                raise value
            if kind == "batch":
                out.append(("batch", value.result(), extra))
            else:
                out.append((kind, value, extra))

    def close(self) -> None:
        """Finish what was submitted (results stay collectable), then stop the threads."""
        self._inbox.put(_STOP)
        self._thread.join()
        self._committer.shutdown(wait=True)

    def _run(self) -> None:
        applier = self.applier
        prev: Future[ApplyResult] | None = None
        while True:
            item = self._inbox.get()
            if item is _STOP:
                return
            try:
                if callable(item):
                    if prev is not None and prev.exception() is not None:
                        return  # a commit failed (already reported): nothing after it may commit
                    prev = None  # chores run alone, after every commit
                    self._outbox.put(("chore", item(), None))
                    continue
                planned = applier.plan(item)  # overlaps the previous commit
                if prev is not None and prev.exception() is not None:
                    return  # commits stay in order; never commit past a failed one
                future = self._committer.submit(applier.commit, planned)
                future.add_done_callback(lambda f, b=item: self._outbox.put(("batch", f, b)))
                prev = future
            except BaseException as exc:  # noqa: BLE001 - handed to the stream loop
                self._outbox.put(("error", exc, None))
                return


__all__ = ["ApplyPipeline", "ApplyResult"]
