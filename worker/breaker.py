"""A circuit breaker for the embedding service, as a small state machine without I/O.

States and transitions are data (`TRANSITIONS`), so a test can enumerate them:

* ``closed`` — calls go through; `failure_threshold` failed calls in a row open it;
* ``open`` — no call goes out (the caller leaves rows pending) until `reset_seconds`
  have passed, then one call may go out as a probe (``half_open``);
* ``half_open`` — the probe's success closes the circuit, its failure opens it again
  (and the wait before the next probe doubles, up to `max_reset_seconds`).

The clock is passed in, so tests drive it without sleeping. Thread-safe: several
concurrent requests share one breaker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]
Event = Literal["success", "failure", "probe"]

# (state, event) -> next state; events not listed leave the state as it is.
TRANSITIONS: dict[tuple[State, Event], State] = {
    ("closed", "failure"): "closed",  # counted; opens at the threshold (see `record`)
    ("closed", "success"): "closed",
    ("open", "probe"): "half_open",
    ("half_open", "success"): "closed",
    ("half_open", "failure"): "open",
}

STATE_VALUES: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}  # for a gauge


class CircuitBreaker:
    def __init__(self, *, failure_threshold: int = 5, reset_seconds: float = 10.0,
                 max_reset_seconds: float = 300.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[State], None] | None = None) -> None:
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self.max_reset_seconds = max_reset_seconds
        self.clock = clock
        self.on_change = on_change
        self.state: State = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self._wait = reset_seconds
        self._probing = False
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """May a call go out now? In ``open`` after the wait, lets exactly one probe through."""
        with self._lock:
            if self.state == "closed":
                return True
            if self.state == "open" and self.clock() - self.opened_at >= self._wait:
                self._move("probe")
                self._probing = True
                return True
            return False  # open and waiting, or half-open with the probe already out

    def seconds_until_probe(self) -> float:
        with self._lock:
            if self.state != "open":
                return 0.0
            return max(0.0, self.opened_at + self._wait - self.clock())

    def record(self, ok: bool) -> None:
        """The outcome of a call that `allow` let through."""
        with self._lock:
            if ok:
                self.failures = 0
                if self.state == "half_open":
                    self._wait = self.reset_seconds
                self._probing = False
                self._move("success")
                return
            self.failures += 1
            if self.state == "half_open":
                self._wait = min(self.max_reset_seconds, self._wait * 2)
                self._probing = False
                self._open()
            elif self.state == "closed" and self.failures >= self.failure_threshold:
                self._open()

    def _open(self) -> None:
        self.opened_at = self.clock()
        if self.state == "half_open":
            self._move("failure")
        else:
            self._set("open")

    def _move(self, event: Event) -> None:
        self._set(TRANSITIONS.get((self.state, event), self.state))

    def _set(self, state: State) -> None:
        if state != self.state:
            self.state = state
            if self.on_change is not None:
                self.on_change(state)
