"""When to cut a batch, when to run a chore, what to acknowledge, how long to wait: no I/O.

The stream runner feeds a `Batcher` what happened (`Received` changes, a `Drained`
socket, a server `KeepaliveReceived`, `Applied` batches, `ChoreFinished`, a `Tick` of
the clock, `StopRequested`) and carries out what it answers (`Submit`, `RunChore`,
`Flush`, `SendStatus`, then exactly one `Wait` or `Stopped`). Time comes in with each
event, so every decision can be tested from events alone.

The rules:

* A batch is cut when it is full (`max_changes` or `max_bytes`), when it has been open
  `max_seconds`, or when the stream has gone quiet between transactions (the reader
  found nothing more to read) — whichever comes first — and only while the pipeline
  has a free slot (`max_in_flight`). A batch that is due while the pipeline is busy
  keeps growing; it goes out the moment a slot frees. No deadline that has passed is
  ever waited for again, so the reader never spins.
* A full batch stops the reading (back-pressure lands on the WAL); whether reading or
  not, a status update goes out at least every `status_interval / 2`, so the
  walsender's timeout never fires while the reader waits on the pipeline.
* Chores (backfill chunks, filling pending embeddings) take a pipeline slot too: at
  once when the pipeline is idle and no batch is open, and under sustained load after
  every `chore_every` batches, when the chore gets the next free slot before any
  batch, so a steady stream that keeps the pipeline full never starves them.
* The flush LSN only ever moves to the checkpoint of a committed batch, or — when
  nothing is open, in flight (a chore included) or mid-transaction — to a keepalive's
  WAL end, so idle tables do not pin WAL, and a worker counts as caught up only once
  a backfill it is running has finished.
* `StopRequested`: nothing more is read or submitted; once what is in flight has been
  applied, `SendStatus` and `Stopped` (the open batch is abandoned, to be streamed again).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .incoming import Batch, SourceChange, TxnEnd

ChoreKind = Literal["backfill", "fill_pending", "compact"]


@dataclass(frozen=True, slots=True)
class BatcherSettings:
    max_changes: int = 2000
    max_bytes: int = 8 * 1024 * 1024
    max_seconds: float = 0.25
    max_in_flight: int = 2  # batches and chores submitted and not yet applied: one being
    # planned while one commits; more only queues, and a queue is latency
    status_interval: float = 10.0
    pending_interval: float = 5.0  # how often pending embeddings are retried
    compact_interval: float | None = None  # how often the change log is compacted (None: never)
    chore_every: int = 8  # under load, a chore gets a turn after this many batches


# -- events in ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Received:
    """Decoded stream items; `partial` is the assembler's position when mid-transaction."""

    now: float
    items: Sequence[SourceChange | TxnEnd]
    in_transaction: bool = False
    partial: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Drained:
    """The reader found nothing more to read right now: the stream is quiet."""

    now: float


@dataclass(frozen=True, slots=True)
class KeepaliveReceived:
    now: float
    wal_end: int


@dataclass(frozen=True, slots=True)
class Applied:
    """A submitted batch committed; `lsn` is the checkpoint it made durable."""

    now: float
    lsn: int


@dataclass(frozen=True, slots=True)
class ChoreFinished:
    """A chore returned; `exhausted` when the backfill has nothing left to copy."""

    now: float
    kind: ChoreKind
    exhausted: bool = False


@dataclass(frozen=True, slots=True)
class Tick:
    """A wait ended with nothing else to report."""

    now: float


@dataclass(frozen=True, slots=True)
class StopRequested:
    now: float


Event = Received | Drained | KeepaliveReceived | Applied | ChoreFinished | Tick | StopRequested


# -- actions out --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Submit:
    batch: Batch


@dataclass(frozen=True, slots=True)
class RunChore:
    kind: ChoreKind


@dataclass(frozen=True, slots=True)
class Flush:
    """Report `lsn` to the server as flushed."""

    lsn: int


@dataclass(frozen=True, slots=True)
class SendStatus:
    """Re-send the last reported positions (keeps the walsender's timeout at bay)."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Block until the pipeline reports, `read` and the socket has data, or `until` (None: no
    deadline). `until` is always in the future."""

    until: float | None
    read: bool


@dataclass(frozen=True, slots=True)
class Stopped:
    abandoned_changes: int


Action = Submit | RunChore | Flush | SendStatus | Wait | Stopped


class Batcher:
    """The stream runner's decisions, as a state machine; see the module docstring."""

    def __init__(self, settings: BatcherSettings, *, now: float, flushed: int = 0,
                 backfill: bool = False) -> None:
        self.settings = settings
        self.flushed = flushed
        self.batch = Batch()
        self.opened = 0.0  # when the open batch got its first item
        self.quiet = False  # the stream went quiet since the open batch got an item
        self.in_transaction = False
        self.partial: tuple[int, int] | None = None
        self.batches_in_flight = 0
        self.chore_in_flight: ChoreKind | None = None
        self.backfill = backfill  # backfill chunks remain to be copied
        self.next_fill = now + settings.pending_interval
        self.next_compact = (now + settings.compact_interval
                             if settings.compact_interval is not None else None)
        self.since_chore = 0  # batches submitted since the last chore
        self.last_status = now
        self.stopping = False
        self.stopped = False

    @property
    def in_flight(self) -> int:
        return self.batches_in_flight + (self.chore_in_flight is not None)

    @property
    def full(self) -> bool:
        s = self.settings
        return len(self.batch.changes) >= s.max_changes or self.batch.bytes >= s.max_bytes

    def send(self, event: Event) -> list[Action]:
        """Take one event; return the actions it calls for, the last one `Wait` or `Stopped`."""
        if self.stopped:
            raise RuntimeError("the batcher has stopped; it takes no more events")
        out: list[Action] = []
        match event:
            case Received(now, items, in_transaction, partial):
                for item in items:
                    if not self.batch:
                        self.opened = now
                    if isinstance(item, TxnEnd):
                        self.batch.completed.append(item)
                    else:
                        self.batch.changes.append(item)
                        self.batch.bytes += item.approx_bytes
                if items:
                    self.quiet = False
                self.in_transaction, self.partial = in_transaction, partial
            case Drained():
                self.quiet = bool(self.batch)
            case KeepaliveReceived(_, wal_end):
                idle = not self.batch and not self.in_flight and not self.in_transaction
                if idle and wal_end > self.flushed:
                    out.append(self._flush(event.now, wal_end))
            case Applied(now, lsn):
                self.batches_in_flight -= 1
                if lsn > self.flushed:
                    out.append(self._flush(now, lsn))
            case ChoreFinished(_, kind, exhausted):
                self.chore_in_flight = None
                if kind == "backfill" and exhausted:
                    self.backfill = False
            case StopRequested():
                self.stopping = True
            case Tick():
                pass
        self._decide(event.now, out)
        return out

    # -- decisions ------------------------------------------------------------------------

    def _flush(self, now: float, lsn: int) -> Flush:
        self.flushed = lsn
        self.last_status = now
        return Flush(lsn)

    def _due(self, now: float) -> bool:
        if not self.batch:
            return False
        if self.full or now - self.opened >= self.settings.max_seconds:
            return True
        return self.quiet and not self.in_transaction

    def _chore_turn(self, now: float) -> ChoreKind | None:
        """The chore whose turn it is (it takes the next free slot before any batch), if any."""
        if self.chore_in_flight is not None:
            return None
        if self.backfill:
            kind: ChoreKind = "backfill"
        elif now >= self.next_fill:
            kind = "fill_pending"
        elif self.next_compact is not None and now >= self.next_compact:
            kind = "compact"
        else:
            return None
        idle = not self.batches_in_flight and not self.batch
        return kind if idle or self.since_chore >= self.settings.chore_every else None

    def _decide(self, now: float, out: list[Action]) -> None:
        s = self.settings
        if self.stopping:
            if self.in_flight:
                self._keepalive(now, out)
                out.append(Wait(self.last_status + s.status_interval / 2, read=False))
            else:
                self.stopped = True
                out += [SendStatus(), Stopped(len(self.batch.changes))]
            return
        kind = self._chore_turn(now)
        if kind is not None and self.in_flight < s.max_in_flight:
            self.chore_in_flight, kind = kind, None
            self.since_chore = 0
            if self.chore_in_flight == "fill_pending":
                self.next_fill = now + s.pending_interval
            elif self.chore_in_flight == "compact":
                self.next_compact = now + (s.compact_interval or 0.0)
            out.append(RunChore(self.chore_in_flight))
        # A chore still waiting for its turn gets the next free slot, not a batch.
        if kind is None and self._due(now) and self.in_flight < s.max_in_flight:
            self.batch.partial = self.partial if self.in_transaction else None
            out.append(Submit(self.batch))
            self.batch, self.quiet = Batch(), False
            self.batches_in_flight += 1
            self.since_chore += 1
        read = not self.full
        self._keepalive(now, out)
        timers = [self.last_status + s.status_interval / 2]
        if self.batch and self.in_flight < s.max_in_flight:
            timers.append(self.opened + s.max_seconds)
        if not self.backfill:
            timers.append(self.next_fill)
            if self.next_compact is not None:
                timers.append(self.next_compact)
        future = [t for t in timers if t > now]  # a deadline that has passed is not waited for
        out.append(Wait(min(future) if future else None, read))

    def _keepalive(self, now: float, out: list[Action]) -> None:
        if now - self.last_status >= self.settings.status_interval / 2:
            self.last_status = now
            out.append(SendStatus())


__all__ = [
    "Action", "Applied", "Batcher", "BatcherSettings", "ChoreFinished", "Drained", "Event", "Flush",
    "KeepaliveReceived", "Received", "RunChore", "SendStatus", "StopRequested", "Stopped", "Submit",
    "Tick", "Wait",
]
