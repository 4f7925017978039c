"""The logical replication client: one walsender connection, driven over psycopg's libpq layer.

This module owns the I/O side of the streaming replication protocol: the `wait()`
drivers that run the generators of `replication_proto` against a socket, and
`ReplicationConnection`, which opens a `replication=database` connection, runs the
replication commands (IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT, DROP_REPLICATION_SLOT,
START_REPLICATION ... LOGICAL with pgoutput) and then reads the stream.

Feedback to the server is only what the caller reports: the flushed position sent is
always the last one passed to `send_status()`, never the last LSN received. While the
caller reads, `read_message()` also keeps the connection alive: it answers keepalives
that request a reply, sends a status update every `status_interval` seconds (so
`wal_sender_timeout` does not fire), and, after `receive_timeout / 2` of silence, asks
the server for a reply and declares the link dead if none comes in the other half.

Every failure leaves as a typed error from `slipstream.worker.errors`; the worker's
reconnect loop asks `classify()` / `RetryPolicy` what to do with it.
"""

from __future__ import annotations

import re
import select
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import NamedTuple, Self, TypeVar

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq.abc import PGconn, PGresult
from slipstream.index.errors import ConfigurationError, InvalidIdentifierError, ValidationError

from .errors import (
    ReplicationError,
    ReplicationProtocolError,
    ReplicationStateError,
    error_from_server,
)
from .lsn import MAX_LSN, format_lsn, parse_lsn
from .pgtypes import source_conninfo
from .replication_proto import (
    Keepalive,
    PQGen,
    ReplicationMessage,
    Wait,
    XLogData,
    connect_gen,
    encode_status_update,
    execute_gen,
    fetch_results_gen,
    parse_copy_data,
    pg_now_us,
    read_copy_data_gen,
    send_copy_data_gen,
)

__all__ = [
    "Keepalive",
    "ReplicationConnection",
    "SlotCreated",
    "StatusPositions",
    "SystemIdentity",
    "WaitTimeout",
    "XLogData",
    "wait",
    "wait_conn",
]

T = TypeVar("T")


class WaitTimeout(Exception):
    """`wait()` gave up before the generator finished (internal; never escapes the client)."""


_EVENTS = {
    Wait.R: select.POLLIN,
    Wait.W: select.POLLOUT,
    Wait.RW: select.POLLIN | select.POLLOUT,
}
_READY_R = select.POLLIN | select.POLLERR | select.POLLHUP  # errors surface as a failed read


def _poll(fileno: int, wanted: Wait, deadline: float | None) -> Wait:
    """Wait for `fileno` until `deadline`; return what is ready (raise WaitTimeout on timeout).

    One poll(2) call per wait, nothing to set up or tear down: this runs once per
    replication message that is not already buffered.
    """
    poller = select.poll()
    poller.register(fileno, _EVENTS[wanted])
    while True:
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        events = poller.poll(None if remaining is None else remaining * 1000.0)
        if events:
            mask = events[0][1]
            return (Wait.R if mask & _READY_R else Wait(0)) | (
                Wait.W if mask & select.POLLOUT else Wait(0)
            )
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeout


def wait(gen: PQGen[T], fileno: int, timeout: float | None = None) -> T:
    """Run a protocol generator to its end, waiting on `fileno` for what it yields.

    Raises WaitTimeout if `timeout` seconds pass first (0 polls once); the generator is
    closed then, so pass a timeout only for steps that are safe to abandon (reads).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        wanted = next(gen)
        while True:
            wanted = gen.send(_poll(fileno, wanted, deadline))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        gen.close()


def wait_conn(gen: Generator[tuple[int, Wait], Wait, T], timeout: float | None = None) -> T:
    """Like `wait()`, for generators that yield (socket, Wait) because the socket may change."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        fileno, wanted = next(gen)
        while True:
            fileno, wanted = gen.send(_poll(fileno, wanted, deadline))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        gen.close()


class SystemIdentity(NamedTuple):
    """IDENTIFY_SYSTEM: cluster id, current timeline, current WAL flush LSN, database."""

    systemid: str
    timeline: int
    xlogpos: int
    dbname: str | None


class SlotCreated(NamedTuple):
    """CREATE_REPLICATION_SLOT: the slot, the LSN from which its stream is consistent, and
    the exported snapshot's name (None unless one was asked for)."""

    slot_name: str
    consistent_point: int
    snapshot_name: str | None


class StatusPositions(NamedTuple):
    """The positions last reported to the server (LSN + 1 of the last byte)."""

    written: int
    flushed: int
    applied: int


class _State(Enum):
    IDLE = "idle"  # replication commands allowed
    STREAMING = "streaming"  # in CopyBoth: read_message / send_status only
    CLOSED = "closed"


_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")
_FULL_PATH = object()  # `_ready_copy_data`: libpq reported something the general path reports


def _slot_name(name: str) -> str:
    if not isinstance(name, str) or not _SLOT_NAME.fullmatch(name):
        raise InvalidIdentifierError(
            f"invalid replication slot name {name!r}: use 1-63 lower-case letters, digits "
            "and underscores (Postgres accepts nothing else)"
        )
    return name


def _lsn_arg(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LSN:
        raise ValidationError(f"{name} must be an LSN as an int in [0, 2**64), got {value!r}")
    return value


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _quote_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class ReplicationConnection:
    """A walsender connection for one database: replication commands, then one stream.

    Open it with `ReplicationConnection.connect(dsn)`; use it as a context manager or
    call `close()`. It is not thread-safe; one thread drives it.

    Exported snapshots: `create_slot(..., export_snapshot=True)` returns a snapshot name
    that other sessions can adopt with `SET TRANSACTION SNAPSHOT` (in a REPEATABLE READ
    transaction) to read the tables exactly as of the slot's consistent point. The
    snapshot lives only while this connection stays idle: any further command on it,
    `start_replication()` included, or `close()`, destroys it. So import it elsewhere
    first (the importing transaction then keeps it), and only then go on here.
    """

    def __init__(
        self,
        pgconn: PGconn,
        *,
        status_interval: float = 10.0,
        receive_timeout: float | None = 60.0,
    ) -> None:
        if status_interval <= 0:
            raise ValidationError(f"status_interval must be > 0 seconds, got {status_interval!r}")
        if receive_timeout is not None and receive_timeout <= 0:
            raise ValidationError(f"receive_timeout must be > 0 or None, got {receive_timeout!r}")
        self._pgconn = pgconn
        self._user = (pgconn.user or b"").decode(errors="replace")
        self._dbname = (pgconn.db or b"").decode(errors="replace")
        self._state = _State.IDLE
        self._slot: str | None = None
        self.status_interval = status_interval
        self.receive_timeout = receive_timeout
        self._positions = StatusPositions(0, 0, 0)
        now = time.monotonic()
        self._last_status_sent = now
        self._last_received = now
        self._ping_sent_at: float | None = None

    # --- life cycle ----------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        dsn: str,
        *,
        status_interval: float = 10.0,
        receive_timeout: float | None = 60.0,
        connect_timeout: float = 10.0,
    ) -> ReplicationConnection:
        """Open a `replication=database` connection to the database `dsn` names.

        `dsn` is any libpq connection string or URI; `application_name` defaults to
        'slipstream' (it shows in pg_stat_replication).
        """
        try:
            params = conninfo_to_dict(source_conninfo(dsn))  # the decoder's output settings
        except psycopg.ProgrammingError:
            # Not chained and not quoted: the text could hold a password.
            raise ConfigurationError(
                "the replication DSN is not a valid libpq connection string or URI"
            ) from None
        params["replication"] = "database"
        params.setdefault("application_name", "slipstream")
        pgconn = pq.PGconn.connect_start(make_conninfo("", **params).encode())
        user = (pgconn.user or b"").decode(errors="replace")
        dbname = (pgconn.db or b"").decode(errors="replace")
        try:
            wait_conn(connect_gen(pgconn), timeout=connect_timeout)
            message = pgconn.get_error_message()
        except WaitTimeout:
            message = f"no answer within connect_timeout={connect_timeout} s"
        except psycopg.Error as exc:
            message = str(exc)
        if pgconn.status != pq.ConnStatus.OK:
            pgconn.finish()
            raise error_from_server(
                message, sqlstate=None, connection_lost=True, user=user, dbname=dbname
            )
        pgconn.nonblocking = 1
        conn = cls(pgconn, status_interval=status_interval, receive_timeout=receive_timeout)
        if pgconn.parameter_status(b"server_encoding") == b"SQL_ASCII":
            # It stores any bytes, and converting them to UTF8 fails the whole stream at
            # the first value that is not UTF-8: take them as they are (`pgoutput.NotUtf8`).
            try:
                conn._command("SET client_encoding = 'SQL_ASCII'")
            except BaseException:
                conn.close()
                raise
        return conn

    def close(self) -> None:
        """Close the connection (the walsender ends; an active slot is released). Idempotent."""
        if self._state is not _State.CLOSED:
            self._state = _State.CLOSED
            self._pgconn.finish()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def streaming(self) -> bool:
        return self._state is _State.STREAMING

    def fileno(self) -> int:
        """The connection's socket, for a caller that waits on it together with other files;
        after it polls readable, `read_message(timeout=0)` takes what arrived."""
        return self._pgconn.socket

    @property
    def backend_pid(self) -> int:
        """The walsender's process id (as in pg_stat_replication.pid)."""
        return self._pgconn.backend_pid

    @property
    def reported(self) -> StatusPositions:
        """The positions last given to `send_status()` (0 until the caller reports)."""
        return self._positions

    # --- replication commands --------------------------------------------------------

    def identify_system(self) -> SystemIdentity:
        row = self._single_row(self._command("IDENTIFY_SYSTEM"))
        systemid, timeline, xlogpos, dbname = row
        return SystemIdentity(str(systemid), int(str(timeline)), parse_lsn(str(xlogpos)), dbname)

    def show(self, name: str) -> str:
        """A server setting's value as SHOW prints it (e.g. 'wal_sender_timeout' -> '60s')."""
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
            raise InvalidIdentifierError(f"not a setting name: {name!r}")
        (value,) = self._single_row(self._command(f"SHOW {name}"))
        return str(value)

    def create_slot(
        self, name: str, *, export_snapshot: bool, temporary: bool = False
    ) -> SlotCreated:
        """Create a logical slot with the pgoutput plugin.

        With `export_snapshot=True` the result names a snapshot of the database at the
        slot's consistent point; see the class docstring for how long it lives.
        A temporary slot is dropped when this connection ends, and also (Postgres's
        walsender does this) when any later replication command on it fails.
        """
        _slot_name(name)
        snapshot = "export" if export_snapshot else "nothing"
        kind = " TEMPORARY" if temporary else ""
        command = f"CREATE_REPLICATION_SLOT {name}{kind} LOGICAL pgoutput (SNAPSHOT '{snapshot}')"
        slot_name, point, snapshot_name, _plugin = self._single_row(
            self._command(command, slot=name)
        )
        return SlotCreated(str(slot_name), parse_lsn(str(point)), snapshot_name)

    def drop_slot(self, name: str, *, wait: bool = False) -> None:
        """Drop a slot; with `wait`, wait for it to become inactive instead of failing."""
        _slot_name(name)
        self._command(f"DROP_REPLICATION_SLOT {name}{' WAIT' if wait else ''}", slot=name)

    def start_replication(
        self,
        slot: str,
        start_lsn: int = 0,
        *,
        publication_names: Sequence[str],
        proto_version: int = 1,
        messages: bool = True,
    ) -> None:
        """Start streaming pgoutput changes from `slot` for the given publications.

        The server begins at the later of `start_lsn` and the slot's confirmed flush
        position (0 means "where the slot is"). `proto_version` 2 and above also turns
        on streaming of large in-progress transactions; `messages` includes logical
        decoding messages (pg_logical_emit_message). Afterwards only `read_message()`
        and `send_status()` are allowed.
        """
        _slot_name(slot)
        _lsn_arg("start_lsn", start_lsn)
        if (
            isinstance(publication_names, str)
            or not publication_names
            or not all(isinstance(p, str) and p for p in publication_names)
        ):
            raise ValidationError(
                f"publication_names must be a non-empty list of names, got {publication_names!r}"
            )
        if proto_version not in (1, 2, 3, 4):
            raise ValidationError(f"proto_version must be 1, 2, 3 or 4, got {proto_version!r}")
        options = {
            "proto_version": str(proto_version),
            "publication_names": ",".join(_quote_ident(p) for p in publication_names),
            "messages": "true" if messages else "false",
        }
        if proto_version >= 2:
            options["streaming"] = "on"
        opts = ", ".join(f"{key} {_quote_literal(value)}" for key, value in options.items())
        command = f"START_REPLICATION SLOT {slot} LOGICAL {format_lsn(start_lsn)} ({opts})"
        result = self._command(command, slot=slot)
        if result.status != pq.ExecStatus.COPY_BOTH:
            raise self._fail(f"START_REPLICATION answered {result.status!r}, not CopyBoth")
        self._state = _State.STREAMING
        self._slot = slot
        now = time.monotonic()
        self._last_status_sent = self._last_received = now
        self._ping_sent_at = None

    # --- the stream ----------------------------------------------------------------------

    def read_message(self, timeout: float | None = None) -> ReplicationMessage | None:
        """The next message from the stream, or None if `timeout` seconds pass first.

        None for `timeout` waits as long as it takes. Meanwhile status updates go out
        on schedule, and a keepalive that requests a reply is answered (with the last
        reported positions) before it is returned.
        """
        self._require(_State.STREAMING, "read_message")
        if timeout == 0:
            ready = self._ready_copy_data()
            if ready is None:
                return None
            if ready is not _FULL_PATH:
                return self._received(ready)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            self._send_due_status(now)
            wake = self._next_timer() - now
            if deadline is not None:
                wake = min(wake, deadline - now)
            try:
                data = self._wait(read_copy_data_gen(self._pgconn), max(wake, 0.0))
            except WaitTimeout:
                now = time.monotonic()
                self._check_silence(now)
                if deadline is not None and now >= deadline:
                    return None
                continue
            if not isinstance(data, bytes):
                raise self._stream_ended(data)
            return self._received(data)

    def _ready_copy_data(self) -> bytes | object | None:
        """`read_message(timeout=0)` for the common case, without a generator or a poll(2):
        the payload libpq holds or reads at once from its non-blocking socket, or None
        when nothing has arrived. `_FULL_PATH` when libpq reports anything else, for the
        general path to read again and report as it does."""
        now = time.monotonic()
        self._send_due_status(now)
        pgconn = self._pgconn
        try:
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes == 0:
                pgconn.consume_input()
                nbytes, data = pgconn.get_copy_data(1)
        except psycopg.Error:
            return _FULL_PATH
        if nbytes > 0:
            return bytes(data)
        if nbytes == -1:  # the server ended the copy: what follows says why
            try:
                results = self._wait(fetch_results_gen(pgconn), self.receive_timeout)
            except WaitTimeout:
                raise self._fail("the replication stream ended without a reason",
                                 connection_lost=True) from None
            raise self._stream_ended(results)
        self._check_silence(now)
        return None

    def _check_silence(self, now: float) -> None:
        """Give up on a server that has not answered a request for a reply in time."""
        if (
            self._ping_sent_at is not None
            and self.receive_timeout is not None
            and (now - self._ping_sent_at >= self.receive_timeout / 2)
        ):
            raise self._fail(
                f"no message from the server for {now - self._last_received:.0f} s, "
                "even after asking for a reply",
                connection_lost=True,
            )

    def _received(self, data: bytes) -> ReplicationMessage:
        self._last_received = time.monotonic()
        self._ping_sent_at = None
        try:
            message = parse_copy_data(data)
        except ReplicationProtocolError:
            self.close()
            raise
        if isinstance(message, Keepalive) and message.reply_requested:
            self._send_status_update(reply=False)
        return message

    def send_status(
        self,
        written: int | None = None,
        flushed: int | None = None,
        applied: int | None = None,
        reply: bool = False,
    ) -> None:
        """Report positions to the server now; the slot's confirmed_flush_lsn follows `flushed`.

        Pass the LSN up to which changes are durably applied, e.g. a transaction's end
        LSN once its apply transaction has committed. A position left out keeps its last
        value, except that `written` and `applied` are raised to at least `flushed`.
        `flushed` may not go backwards. With no arguments this re-sends the last
        positions, which keeps the connection alive while the caller is not reading.
        """
        self._require(_State.STREAMING, "send_status")
        last = self._positions
        new_flushed = last.flushed if flushed is None else _lsn_arg("flushed", flushed)
        if new_flushed < last.flushed:
            raise ValidationError(
                f"flushed LSN may not go backwards: {format_lsn(new_flushed)} was given after "
                f"{format_lsn(last.flushed)}"
            )
        new_written = (
            max(last.written, new_flushed) if written is None else _lsn_arg("written", written)
        )
        new_applied = (
            max(last.applied, new_flushed) if applied is None else _lsn_arg("applied", applied)
        )
        self._positions = StatusPositions(new_written, new_flushed, new_applied)
        self._send_status_update(reply)

    # --- internals -----------------------------------------------------------------------

    def _require(self, state: _State, what: str) -> None:
        if self._state is not state:
            raise ReplicationStateError(
                f"{what}() needs a connection that is {state.value}, but this one is "
                f"{self._state.value}"
            )

    def _next_timer(self) -> float:
        """When read_message must next wake up, on its own account (monotonic seconds)."""
        due = self._last_status_sent + self.status_interval
        if self.receive_timeout is not None:
            since = self._last_received if self._ping_sent_at is None else self._ping_sent_at
            due = min(due, since + self.receive_timeout / 2)
        return due

    def _send_due_status(self, now: float) -> None:
        if (
            self.receive_timeout is not None
            and self._ping_sent_at is None
            and now - self._last_received >= self.receive_timeout / 2
        ):
            self._send_status_update(reply=True)  # "are you there?"
        elif now - self._last_status_sent >= self.status_interval:
            self._send_status_update(reply=False)

    def _send_status_update(self, reply: bool) -> None:
        written, flushed, applied = self._positions
        message = encode_status_update(written, flushed, applied, pg_now_us(), reply)
        try:
            self._wait(send_copy_data_gen(self._pgconn, message), self.receive_timeout)
        except WaitTimeout:
            raise self._fail(
                f"could not send a status update within {self.receive_timeout} s",
                connection_lost=True,
            ) from None
        self._last_status_sent = time.monotonic()
        if reply and self._ping_sent_at is None:
            self._ping_sent_at = self._last_status_sent

    def _wait(self, gen: PQGen[T], timeout: float | None) -> T:
        with self._translate_errors():
            return wait(gen, self._pgconn.socket, timeout)

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        """libpq failures (connection lost, bad copy data) leave as our typed errors."""
        try:
            yield
        except psycopg.Error as exc:
            raise self._fail(str(exc), sqlstate=exc.sqlstate, connection_lost=True) from exc

    def _command(self, command: str, *, slot: str | None = None) -> PGresult:
        """Run one replication command; return its last result or raise the typed error."""
        self._require(_State.IDLE, command.split(" ", 1)[0].lower())
        results = self._wait(execute_gen(self._pgconn, command.encode()), None)
        for result in results:
            if result.status in (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.BAD_RESPONSE):
                raise self._fail_from_result(result, slot)
        if not results:
            raise self._fail(f"no result for {command.split(' ', 1)[0]}", connection_lost=True)
        return results[-1]

    def _single_row(self, result: PGresult) -> tuple[str | None, ...]:
        if result.ntuples != 1:
            raise self._fail(f"expected one row from the server, got {result.ntuples}")
        return tuple(
            None if (v := result.get_value(0, col)) is None else v.decode()
            for col in range(result.nfields)
        )

    def _stream_ended(self, results: list[PGresult]) -> ReplicationError:
        for result in results:
            if result.status == pq.ExecStatus.FATAL_ERROR:
                return self._fail_from_result(result, self._slot, connection_lost=True)
        return self._fail("the server ended the replication stream", connection_lost=True)

    def _fail_from_result(
        self, result: PGresult, slot: str | None, *, connection_lost: bool = False
    ) -> ReplicationError:
        sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
        return self._fail(
            (result.error_message or b"").decode(errors="replace"),
            sqlstate=sqlstate.decode() if sqlstate else None,
            connection_lost=connection_lost or self._pgconn.status == pq.ConnStatus.BAD,
            slot=slot,
        )

    def _fail(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        connection_lost: bool = False,
        slot: str | None = None,
    ) -> ReplicationError:
        """Build the typed error; close the connection if it cannot be used any more."""
        error = error_from_server(
            message,
            sqlstate=sqlstate,
            connection_lost=connection_lost,
            user=self._user,
            dbname=self._dbname,
            slot=slot or self._slot,
        )
        if connection_lost or self._state is _State.STREAMING:
            self.close()
        return error
