"""The streaming replication protocol without I/O: message codecs and libpq step generators.

This module owns the byte layouts of the replication sub-protocol carried in CopyData
(XLogData 'w', primary keepalive 'k', standby status update 'r') and the protocol steps
as generators, in the style of psycopg's `generators.py`: each step calls non-blocking
libpq functions and, when it would block, yields the `Wait` it needs (read, write or
both); a driver (`slipstream.worker.replication.wait`) waits on the socket and sends
back the `Wait` flags that are ready. Nothing here opens a socket, sleeps or reads a clock
unless it is given one, so the codecs are tested from bytes alone and the generators
from any driver.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntFlag
from typing import TypeAlias, TypeVar

import psycopg
from psycopg import pq
from psycopg.pq.abc import PGconn, PGresult
from slipstream.index.errors import ValidationError

from .errors import ReplicationProtocolError
from .lsn import MAX_LSN

T = TypeVar("T")

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
PG_EPOCH_UNIX_US = 946_684_800 * 1_000_000  # 2000-01-01 in µs since 1970-01-01


class Wait(IntFlag):
    """What a generator waits for on the socket; the driver sends back what is ready."""

    R = 1
    W = 2
    RW = 3


# A protocol step: yields Wait, is sent the ready Wait flags, returns T.
PQGen: TypeAlias = Generator[Wait, Wait, T]


# --- CopyData codecs -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class XLogData:
    """'w': a piece of WAL (for pgoutput, one logical message) starting at `wal_start`.

    `wal_end` is the server's current end of WAL, `send_time` the server clock in µs
    since 2000-01-01 UTC, `payload` the output plugin's bytes.
    """

    wal_start: int
    wal_end: int
    send_time: int
    payload: bytes

    @property
    def sent_at(self) -> datetime:
        return pg_time_to_datetime(self.send_time)


@dataclass(frozen=True, slots=True)
class Keepalive:
    """'k': the server is alive; `reply_requested` asks for a status update at once."""

    wal_end: int
    send_time: int
    reply_requested: bool

    @property
    def sent_at(self) -> datetime:
        return pg_time_to_datetime(self.send_time)


ReplicationMessage: TypeAlias = XLogData | Keepalive

_XLOG_HEADER = struct.Struct(">QQq")  # after the b'w': wal_start, wal_end, send_time
_KEEPALIVE = struct.Struct(">QqB")  # after the b'k': wal_end, send_time, reply
_STATUS_UPDATE = struct.Struct(">cQQQqB")  # b'r', written, flushed, applied, time, reply


def parse_copy_data(data: bytes | memoryview) -> ReplicationMessage:
    """Decode one CopyData payload from a walsender; raise ReplicationProtocolError if malformed."""
    buf = bytes(data)
    if not buf:
        raise ReplicationProtocolError("empty CopyData message in the replication stream")
    kind, body = buf[:1], buf[1:]
    if kind == b"w":
        if len(body) < _XLOG_HEADER.size:
            raise ReplicationProtocolError(
                f"XLogData message too short: {len(buf)} bytes, the header alone is "
                f"{1 + _XLOG_HEADER.size}"
            )
        start, end, sent = _XLOG_HEADER.unpack_from(body)
        return XLogData(start, end, sent, body[_XLOG_HEADER.size :])
    if kind == b"k":
        if len(body) != _KEEPALIVE.size:
            raise ReplicationProtocolError(
                f"keepalive message has {len(buf)} bytes, expected {1 + _KEEPALIVE.size}"
            )
        end, sent, reply = _KEEPALIVE.unpack(body)
        return Keepalive(end, sent, bool(reply))
    raise ReplicationProtocolError(
        f"unknown replication message type {kind!r} ({len(buf)} bytes); this client "
        "understands XLogData (b'w') and keepalive (b'k')"
    )


def encode_status_update(
    written: int, flushed: int, applied: int, client_time_us: int, reply: bool = False
) -> bytes:
    """The standby status update 'r' (34 bytes): positions + 1 of the last byte written,
    flushed and applied, the client clock in µs since 2000-01-01 UTC, and whether the
    server should answer at once."""
    for name, lsn in (("written", written), ("flushed", flushed), ("applied", applied)):
        if isinstance(lsn, bool) or not isinstance(lsn, int) or not 0 <= lsn <= MAX_LSN:
            raise ValidationError(f"{name} LSN must be an int in [0, 2**64), got {lsn!r}")
    return _STATUS_UPDATE.pack(b"r", written, flushed, applied, client_time_us, int(reply))


def pg_now_us(clock_ns: Callable[[], int] = time.time_ns) -> int:
    """Now, in Postgres's TimestampTz form: µs since 2000-01-01 UTC."""
    return clock_ns() // 1000 - PG_EPOCH_UNIX_US


def pg_time_to_datetime(us: int) -> datetime:
    return PG_EPOCH + timedelta(microseconds=us)


# --- protocol steps as generators ------------------------------------------------


def flush_gen(pgconn: PGconn) -> PQGen[None]:
    """Push libpq's output buffer to the server, reading input meanwhile so neither side stalls."""
    while pgconn.flush() != 0:
        ready = yield Wait.RW
        if ready & Wait.R:
            pgconn.consume_input()


def execute_gen(pgconn: PGconn, command: bytes) -> PQGen[list[PGresult]]:
    """Send one simple-protocol command and collect its results.

    Stops after a COPY result (START_REPLICATION answers CopyBothResponse and then
    streams; libpq would hand out that COPY result forever).
    """
    pgconn.send_query(command)
    yield from flush_gen(pgconn)
    return (yield from fetch_results_gen(pgconn))


def fetch_results_gen(pgconn: PGconn) -> PQGen[list[PGresult]]:
    """Collect results until libpq says there are no more (or a COPY state begins)."""
    results: list[PGresult] = []
    copy_states = (pq.ExecStatus.COPY_BOTH, pq.ExecStatus.COPY_OUT, pq.ExecStatus.COPY_IN)
    lost: psycopg.OperationalError | None = None
    while True:
        while lost is None and pgconn.is_busy() and pgconn.status != pq.ConnStatus.BAD:
            yield Wait.R
            try:
                pgconn.consume_input()
            except psycopg.OperationalError as exc:
                lost = exc  # libpq may have parsed the server's error first: ask for it
        result = pgconn.get_result()
        if result is None:
            if lost is not None and not results:
                raise lost
            return results
        results.append(result)
        if result.status in copy_states:
            return results


def read_copy_data_gen(pgconn: PGconn) -> PQGen[bytes | list[PGresult]]:
    """Return the next CopyData payload; or, once the server has ended the copy (CopyDone
    or an error), the results that follow it, for the caller to judge.

    Safe to abandon between yields: libpq keeps whatever it has read. When the socket
    closes, libpq may still hold the server's last words (e.g. FATAL 57P01 from
    pg_terminate_backend), so those are returned before the closed socket is reported.
    """
    lost: psycopg.OperationalError | None = None
    while True:
        nbytes, data = pgconn.get_copy_data(1)
        if nbytes > 0:
            return bytes(data)
        if nbytes == -1:
            return (yield from fetch_results_gen(pgconn))
        if lost is not None:
            raise lost
        yield Wait.R  # nbytes == 0: no complete row buffered yet
        try:
            pgconn.consume_input()
        except psycopg.OperationalError as exc:
            lost = exc  # look at what is buffered once more, then give up


def send_copy_data_gen(pgconn: PGconn, data: bytes) -> PQGen[None]:
    """Queue one CopyData message and flush it to the server."""
    while pgconn.put_copy_data(data) == 0:
        yield Wait.W
    yield from flush_gen(pgconn)


def connect_gen(pgconn: PGconn) -> Generator[tuple[int, Wait], Wait, PGconn]:
    """Finish opening a connection begun with `PGconn.connect_start()`, without blocking.

    Yields (socket, Wait), because libpq may switch sockets while it tries the hosts of
    a multi-host DSN. Returns the PGconn whether or not it succeeded: the caller reads
    `status` and the error message, and `finish()`es it on failure.
    """
    while pgconn.status != pq.ConnStatus.BAD:
        status = pgconn.connect_poll()
        if status == pq.PollingStatus.OK or status == pq.PollingStatus.FAILED:
            break
        if status == pq.PollingStatus.READING:
            yield pgconn.socket, Wait.R
        elif status == pq.PollingStatus.WRITING:
            yield pgconn.socket, Wait.W
        else:  # pragma: no cover - libpq documents no other state
            raise ReplicationProtocolError(f"unexpected libpq polling status {status!r}")
    return pgconn
