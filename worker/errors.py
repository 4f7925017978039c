"""Replication errors and the one retry policy the worker's reconnect loop follows.

This module owns three things, so that error handling lives in one place:

* the typed errors the replication client and the apply side raise (all
  `SlipstreamError`s), each with a message an operator can act on — what happened
  and, where there is one, the fix;
* `error_from_server()` and `error_from_search()`: the only places that turn a
  server or libpq error (SQLSTATE plus message text) from the source's replication
  connection, or from the search database, into one of those types;
* `classify()` and `RetryPolicy`: retry or stop, and how long to wait before retrying
  (exponential backoff, capped, with jitter). The same policy serves the replication
  reconnect loop and the embedding client: an error may carry `retry_after` (a
  server's ``Retry-After``), which the policy honours up to `max_retry_after`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from typing import ParamSpec, TypeVar

import psycopg
from slipstream.index.errors import ConfigurationError, SlipstreamError
from slipstream.shardsync.retry import Decision, decide_by_table
from slipstream.shardsync.retry import RetryPolicy as BaseRetryPolicy


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


class SlotInvalidatedError(ReplicationError):
    """The server invalidated the slot (`wal_status = 'lost'`): the WAL it needed is gone.

    Changes made while the slot was behind can no longer be streamed, so the index
    must be rebuilt from a fresh copy; the message says what to run.
    """


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


class SearchDatabaseError(SlipstreamError):
    """A statement on the search database failed; `sqlstate` keeps the server's code.

    Whether the worker retries depends on the SQLSTATE class (see `classify`): a
    lost connection, a deadlock or a server shutting down is retried; a missing table
    or a constraint violation stops the worker.
    """

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class SearchPermissionError(SearchDatabaseError, ConfigurationError):
    """The worker's role lacks a privilege on the search database; the message says what."""


def slot_invalidated_message(slot: str, schema: str = "slipstream", detail: str = "") -> str:
    """What happened to an invalidated slot and what the operator runs to recover."""
    said = f" (server said: {detail})" if detail else ""
    return (
        f"replication slot {slot!r} was invalidated by the server (wal_status = 'lost'){said}: "
        "it fell further behind than max_slot_wal_keep_size allows, the WAL it still needed "
        "was removed, and changes made since can no longer be streamed. To recover, stop "
        f"every worker, run SELECT pg_drop_replication_slot('{slot}'); on the source, then "
        "`slipstream setup`: a new slot, in whose snapshot every table is copied again, "
        "rows changed meanwhile rewritten and rows deleted meanwhile tombstoned, so devices "
        f"catch up by delta (DROP SCHEMA {_ident(schema)} CASCADE; on the search database "
        "before setup starts the index from nothing instead, and devices re-download their "
        "shards). To keep it from recurring, raise max_slot_wal_keep_size (or set it to -1) "
        "and alert on slipstream_slot_lag_bytes."
    )


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
_INVALIDATED_TEXT = re.compile(
    r"can no longer (get changes from|access) replication slot|slot .*has been invalidated"
    r"|replication slot .* (is|has been) invalidated",
    re.IGNORECASE,
)
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
    if _INVALIDATED_TEXT.search(server):
        return SlotInvalidatedError(slot_invalidated_message(slot or "?", detail=server), **kw)
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


class TableRenamedError(ConfigurationError):
    """A configured table was renamed (or moved to another schema) while the worker
    followed it: its changes now arrive under a name the configuration does not list."""


class TeardownRefusedError(SlipstreamError):
    """`slipstream teardown` will not drop something (a schema shared with the
    application, a slot of another database); it names what and why."""


class EmbeddingError(SlipstreamError):
    """The embedding service failed or answered something unusable; rows stay pending."""

    retry_after: float | None = None


class EmbeddingTransientError(EmbeddingError):
    """429, a 5xx, a timeout or a lost connection: worth retrying after a wait.

    `retry_after` is the server's ``Retry-After`` in seconds, when it sent one.
    """

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class EmbeddingRejectedError(EmbeddingError):
    """The service refused the request (a 4xx other than 429) or answered the wrong shape:
    retrying the same request cannot help. The message says what to fix. `status` is the
    HTTP status when the service refused the request itself."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EmbeddingCircuitOpenError(EmbeddingError):
    """The circuit breaker is open: the service kept failing, so it is not called until
    the next probe. Rows stay pending and are filled when the service is back."""


def error_from_search(exc: Exception, *, doing: str) -> SearchDatabaseError:
    """Type a psycopg error raised on the search database while `doing` something."""
    sqlstate = getattr(exc, "sqlstate", None)
    server = _clean(str(exc)) or type(exc).__name__
    if sqlstate == "42501":
        return SearchPermissionError(
            f"the worker's role may not {doing} on the search database (server said: {server}). "
            "Grant it USAGE and CREATE on the search schema and ownership of (or INSERT, "
            "UPDATE, DELETE, SELECT on) its tables, or run the worker as the schema's owner.",
            sqlstate=sqlstate,
        )
    if sqlstate is None or sqlstate[:2] in RETRYABLE_SQLSTATE_CLASSES:
        return SearchDatabaseError(
            f"the search database failed while the worker tried to {doing} (server said: "
            f"{server}); the worker retries and resumes from its last checkpoint.",
            sqlstate=sqlstate,
        )
    return SearchDatabaseError(
        f"the search database refused to {doing} (SQLSTATE {sqlstate}, server said: {server}). "
        "This is not transient: check the search schema (`slipstream setup` creates it) "
        "and the server's log.",
        sqlstate=sqlstate,
    )


P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def search_errors(doing: str) -> Iterator[None]:
    """Raise psycopg errors from the block as `SearchDatabaseError`s (see `error_from_search`)."""
    try:
        yield
    except psycopg.Error as exc:
        raise error_from_search(exc, doing=doing) from exc


def on_search_database(doing: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator form of `search_errors`, for a method whose statements go to the search side."""

    def wrap(func: Callable[P, R]) -> Callable[P, R]:
        @wraps(func)
        def typed(*args: P.args, **kwargs: P.kwargs) -> R:
            with search_errors(doing):
                return func(*args, **kwargs)

        return typed

    return wrap


# Decisions by error type; the first class in an exception's MRO that is listed wins.
# ReplicationServerError and SearchDatabaseError are decided by SQLSTATE class instead.
DECISIONS: dict[type[BaseException], Decision] = {
    ReplicationConnectionError: "retry",
    SlotInUseError: "retry",
    SlotInvalidatedError: "stop",
    SearchPermissionError: "stop",
    SlotNotFoundError: "stop",
    SlotAlreadyExistsError: "stop",
    ReplicationPermissionError: "stop",
    WalLevelError: "stop",
    ReplicationAuthError: "stop",
    ReplicationProtocolError: "stop",
    ReplicationStateError: "stop",
    ConnectionError: "retry",
    TimeoutError: "retry",
    EmbeddingTransientError: "retry",
    EmbeddingRejectedError: "stop",
    EmbeddingCircuitOpenError: "stop",
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
    if type(exc) is SearchDatabaseError:  # no SQLSTATE: the connection itself failed
        return "retry" if (exc.sqlstate or "08")[:2] in RETRYABLE_SQLSTATE_CLASSES else "stop"
    return decide_by_table(exc, DECISIONS)


@dataclass(frozen=True, slots=True)
class RetryPolicy(BaseRetryPolicy):
    """The project's retry policy (`slipstream.shardsync.retry`) with the worker's table:
    the reconnect loop and the embedding client decide through `classify` above."""

    def classify(self, exc: BaseException) -> Decision:
        return classify(exc)
