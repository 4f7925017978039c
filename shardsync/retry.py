"""Retry or stop, and how long to wait first: the one retry policy of the project.

`RetryPolicy` owns the mechanics every retrying loop shares — exponential backoff with
jitter, a cap, an optional limit on consecutive failures, and a server's
``Retry-After`` honoured up to a bound. What is worth retrying is a table of error
types, walked most-specific-first by MRO; each side brings its own table and
subclasses the policy with its `classify`: the worker's reconnect loop and embedding
client (`slipstream.worker.errors`), and the device sync client
(`slipstream.shardsync.client`). Standard library only, so a device can use it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Decision = Literal["retry", "stop"]


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What to do after a failure: `action`, how long to sleep first, and why (operator text)."""

    action: Decision
    delay: float
    reason: str


def decide_by_table(exc: BaseException, table: Mapping[type[BaseException], Decision]) -> Decision:
    """The decision for the first class in `exc`'s MRO that `table` lists; 'stop' if none."""
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return "stop"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped.

    Retry number `attempt` (0 for the first retry) waits a uniform random time in
    [d/2, d] with d = min(max_delay, initial_delay * multiplier**attempt): the delay
    grows quickly, never exceeds the cap, and clients restarted together spread out.
    After `max_attempts` consecutive failures (None: never) even retryable errors stop.
    An error with a `retry_after` (seconds the server asked for, as in HTTP
    ``Retry-After``) waits at least that long, up to `max_retry_after`. A connection
    that held for `healthy_after` seconds ends the run of failures: the next one is
    attempt 0 again (`attempt_after`). Subclasses say which errors are worth retrying (`classify`).
    """

    initial_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    max_attempts: int | None = None
    max_retry_after: float = 60.0
    healthy_after: float = 60.0

    def attempt_after(self, attempt: int, held: float) -> int:
        """The attempt number for a failure that ended a connection which held `held` seconds."""
        return 0 if held >= self.healthy_after else attempt

    def classify(self, exc: BaseException) -> Decision:
        return "stop"

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        exponent = min(max(attempt, 0), 64)  # past the cap anyway; avoids float overflow
        ceiling = min(self.max_delay, self.initial_delay * self.multiplier**exponent)
        return (rng or random).uniform(ceiling / 2, ceiling)

    def decide(
        self, exc: BaseException, attempt: int, rng: random.Random | None = None
    ) -> RetryDecision:
        action = self.classify(exc)
        if action == "retry" and self.max_attempts is not None and attempt >= self.max_attempts:
            return RetryDecision("stop", 0.0, f"gave up after {attempt} attempts: {exc}")
        delay = self.backoff(attempt, rng) if action == "retry" else 0.0
        asked = getattr(exc, "retry_after", None)
        if action == "retry" and isinstance(asked, int | float) and asked > 0:
            delay = max(delay, min(float(asked), self.max_retry_after))
        return RetryDecision(action, delay, str(exc))
