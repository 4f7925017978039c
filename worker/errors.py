"""Replication errors and the one retry policy the worker's reconnect loop follows.

This module owns three things, so that error handling lives in one place:

* the typed errors the replication client raises (all `SlipstreamError`s), each with
  a message an operator can act on — what happened and, where there is one, the fix;
* `error_from_server()`: the only place that turns a server or libpq error (SQLSTATE
  plus message text) into one of those types;
* `classify()` and `RetryPolicy`: retry or stop, and how long to wait before retrying
  (exponential backoff, capped, with jitter).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

import psycopg
from slipstream.index.errors import ConfigurationError, SlipstreamError

Decision = Literal["retry", "stop"]


class ReplicationError(SlipstreamError):
    """A replication command or the replication stream failed.

    `sqlstate` and `server_message` keep what the server (or libpq) said, when it said
    anything; the exception's own message is the operator-readable summary.
    """

    def __init__(
        self, message: str, *, sqlstate: str | None = None, server_message: str | None = None
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.server_message = server_message


class ReplicationConnectionError(ReplicationError):
    """The replication connection could not be opened or was lost; retry and resume."""


class SlotInUseError(ReplicationError):
    """The slot is active for another connection (SQLSTATE 55006); retry after a delay."""


class SlotNotFoundError(ReplicationError):
    """The named replication slot does not exist (SQLSTATE 42704)."""


class SlotAlreadyExistsError(ReplicationError):
    """CREATE_REPLICATION_SLOT named a slot that already exists (SQLSTATE 42710)."""


class ReplicationPermissionError(ReplicationError, ConfigurationError):
    """The role may not replicate (SQLSTATE 42501); the message says what to grant."""


class WalLevelError(ReplicationError, ConfigurationError):
    """The server's wal_level is below 'logical'; the message says how to fix it."""


class ReplicationAuthError(ReplicationError, ConfigurationError):
    """The server refused the login itself (password, pg_hba.conf, unknown role or database)."""


class ReplicationProtocolError(ReplicationError):
    """A replication message did not have the layout the protocol defines."""


class ReplicationStateError(ReplicationError):
    """A method was called in a state that does not allow it (e.g. reading before streaming)."""


class ReplicationServerError(ReplicationError):
    """Any other server error; whether it is retried depends on its SQLSTATE class."""


def _ident(name: str) -> str:
    """Quote a name for the SQL shown in a message, only when it needs quoting."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _clean(message: str) -> str:
    """libpq's text without the severity prefix and trailing newline."""
    return re.sub(r"^(ERROR|FATAL|PANIC):\s+", "", message.strip())


# Connection-time failures carry no SQLSTATE (libpq reports only text), so these
# patterns recognise the ones that retrying cannot fix.
_PERMISSION_TEXT = re.compile(
    r"permission denied to start WAL sender|must be superuser or replication role"
    r"|REPLICATION attribute|permission denied for (database|table|publication)",
    re.IGNORECASE,
)
_AUTH_TEXT = re.compile(
    r"authentication failed|no pg_hba\.conf entry|role \".*\" does not exist"
    r"|database \".*\" does not exist|password is required|no password supplied",
    re.IGNORECASE,
)
_WAL_LEVEL_TEXT = re.compile(r"wal_level", re.IGNORECASE)
_CONNECTION_SQLSTATES = {"57P01", "57P02", "57P03"}  # admin/crash shutdown, cannot connect now


def error_from_server(
    message: str,
    *,
    sqlstate: str | None,
    connection_lost: bool,
    user: str,
    dbname: str,
    slot: str | None = None,
) -> ReplicationError:
    """Turn what the server or libpq said into the typed error the caller should see.

    `connection_lost` is true when libpq reports the connection unusable (at connect
    time, or mid-stream). `user`, `dbname` and `slot` only make the messages concrete.
    """
    server = _clean(message) or "no message from the server"
    kw = {"sqlstate": sqlstate, "server_message": server}
    slot_txt = f"replication slot {slot!r}" if slot else "the replication slot"
    if sqlstate == "42501" or _PERMISSION_TEXT.search(server):
        return ReplicationPermissionError(
            f"role {user!r} may not stream logical replication from database {dbname!r} "
            f"(server said: {server}). As a superuser, run: ALTER ROLE {_ident(user)} WITH "
            f"REPLICATION; then GRANT SELECT ON each published table TO {_ident(user)}; and, if "
            f"slipstream is to create the publication, GRANT CREATE ON DATABASE {_ident(dbname)} "
            f"TO {_ident(user)}; (or have an owner create it).",
            **kw,
        )
    if sqlstate in ("55000", None) and _WAL_LEVEL_TEXT.search(server) and "logical" in server:
        return WalLevelError(
            f"the server is not configured for logical decoding (server said: {server}). "
            "Set `wal_level = logical` in postgresql.conf (or run ALTER SYSTEM SET wal_level = "
            "logical;) and restart the server; a reload is not enough.",
            **kw,
        )
    if sqlstate == "55006":
        return SlotInUseError(
            f"{slot_txt} is in use by another connection (server said: {server}). Another "
            "worker is probably streaming from it; this one retries, and the slot is released "
            "when that connection ends (or after wal_sender_timeout if it died).",
            **kw,
        )
    if sqlstate == "42704" and "replication slot" in server:
        return SlotNotFoundError(
            f"{slot_txt} does not exist in database {dbname!r} (server said: {server}). "
            "Check the configured slot name, or let the worker create the slot on first start.",
            **kw,
        )
    if sqlstate == "42710":
        return SlotAlreadyExistsError(
            f"{slot_txt} already exists (server said: {server}). Stream from it, or drop it "
            f"with SELECT pg_drop_replication_slot({slot!r}); if it is stale.",
            **kw,
        )
    if sqlstate is None and _AUTH_TEXT.search(server):
        return ReplicationAuthError(
            f"the server refused the replication login as {user!r} to database {dbname!r} "
            f"(server said: {server}). Check the DSN's user, password and database, and that "
            "pg_hba.conf admits this host for that database.",
            **kw,
        )
    if connection_lost or (sqlstate or "").startswith("08") or sqlstate in _CONNECTION_SQLSTATES:
        return ReplicationConnectionError(
            f"the replication connection to database {dbname!r} failed or was lost "
            f"(server said: {server}); the worker reconnects and resumes from the last "
            "flushed LSN.",
            **kw,
        )
    return ReplicationServerError(f"replication command failed: {server}", **kw)


# Decisions by error type; the first class in an exception's MRO that is listed wins.
DECISIONS: dict[type[BaseException], Decision] = {
    ReplicationConnectionError: "retry",
    SlotInUseError: "retry",
    SlotNotFoundError: "stop",
    SlotAlreadyExistsError: "stop",
    ReplicationPermissionError: "stop",
    WalLevelError: "stop",
    ReplicationAuthError: "stop",
    ReplicationProtocolError: "stop",
    ReplicationStateError: "stop",
    ConnectionError: "retry",
    TimeoutError: "retry",
    psycopg.OperationalError: "retry",  # e.g. the search database's connection was lost
    OSError: "retry",
}

# For ReplicationServerError: transient SQLSTATE classes (connection exception,
# insufficient resources, operator intervention, transaction rollback).
RETRYABLE_SQLSTATE_CLASSES = frozenset({"08", "53", "57", "40"})


def classify(exc: BaseException) -> Decision:
    """'retry' when reconnecting later can succeed without anyone's help, else 'stop'."""
    if isinstance(exc, ReplicationServerError):
        return "retry" if (exc.sqlstate or "")[:2] in RETRYABLE_SQLSTATE_CLASSES else "stop"
    for cls in type(exc).__mro__:
        if cls in DECISIONS:
            return DECISIONS[cls]
    return "stop"


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What to do after a failure: `action`, how long to sleep first, and why (operator text)."""

    action: Decision
    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped, for the worker's reconnect loop.

    Retry number `attempt` (0 for the first retry) waits a uniform random time in
    [d/2, d] with d = min(max_delay, initial_delay * multiplier**attempt): the delay
    grows quickly, never exceeds the cap, and workers restarted together spread out.
    After `max_attempts` consecutive failures (None: never) even retryable errors stop.
    A connection that held for `healthy_after` seconds ends the run of failures: the
    next one is attempt 0 again (`attempt_after`).
    """

    initial_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    max_attempts: int | None = None
    healthy_after: float = 60.0

    def attempt_after(self, attempt: int, held: float) -> int:
        """The attempt number for a failure that ended a connection which held `held` seconds."""
        return 0 if held >= self.healthy_after else attempt

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        exponent = min(max(attempt, 0), 64)  # past the cap anyway; avoids float overflow
        ceiling = min(self.max_delay, self.initial_delay * self.multiplier**exponent)
        return (rng or random).uniform(ceiling / 2, ceiling)

    def decide(
        self, exc: BaseException, attempt: int, rng: random.Random | None = None
    ) -> RetryDecision:
        action = classify(exc)
        if action == "retry" and self.max_attempts is not None and attempt >= self.max_attempts:
            return RetryDecision("stop", 0.0, f"gave up after {attempt} attempts: {exc}")
        delay = self.backoff(attempt, rng) if action == "retry" else 0.0
        return RetryDecision(action, delay, str(exc))
