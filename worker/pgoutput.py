"""Decoding of pgoutput logical replication messages: bytes in, frozen events out.

This module owns the wire format of the messages that the `pgoutput` plugin puts
inside each XLogData payload (protocol versions 1 to 4), and nothing else: no
sockets, no value decoding (see `pgtypes`), no relation bookkeeping (see
`relations`). `decode(data)` returns one event or raises `DecodeError`; it never
lets another exception type escape, so a caller can treat any other exception as
a bug of ours rather than bad input.

Column values in a `TupleData` stay as the server sent them: `NULL`, `UNCHANGED`
(an unchanged TOASTed value, pgoutput's 'u'), `str` for text format (decoded as
UTF-8: the connection asks for it) and `bytes` for binary format. A text value
whose bytes are not UTF-8 (a SQL_ASCII database stores any bytes, and then sends
them as they are) becomes a `NotUtf8`: the message still decodes, and the value is
refused where it is read (`pgtypes.decode_text`), so only its row is a dead letter.
Timestamps become aware UTC datetimes; LSNs, xids and OIDs are plain ints.

Two-phase commit messages (protocol v3 with `two_phase`) are not decoded: they
raise `DecodeError` like any other unknown message type.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, TypeAlias

from slipstream.index.errors import SlipstreamError

__all__ = [
    "NULL",
    "UNCHANGED",
    "Begin",
    "Column",
    "Commit",
    "DecodeError",
    "Delete",
    "Event",
    "Insert",
    "Marker",
    "Message",
    "NotUtf8",
    "Origin",
    "Relation",
    "StreamAbort",
    "StreamCommit",
    "StreamStart",
    "StreamStop",
    "Truncate",
    "TupleData",
    "Type",
    "Update",
    "Value",
    "decode",
]


class DecodeError(SlipstreamError, ValueError):
    """Bytes (or text) that do not form a valid message or value; says where and why."""


class Marker(enum.Enum):
    """Column values that carry no data: SQL NULL, or a TOASTed value left unchanged."""

    NULL = "n"
    UNCHANGED = "u"

    def __repr__(self) -> str:
        return self.name


NULL = Marker.NULL
UNCHANGED = Marker.UNCHANGED


class NotUtf8(str):
    """A text value whose bytes are not UTF-8: shown with `\\xNN` for each byte that is
    not, and the bytes themselves in `raw` (to name the row to the server again)."""

    __slots__ = ("raw",)
    raw: bytes

    def __new__(cls, raw: bytes) -> NotUtf8:
        self = super().__new__(cls, raw.decode("utf-8", "backslashreplace"))
        self.raw = raw
        return self


def text_value(raw: bytes) -> str:
    """A text value's bytes as `str`; a `NotUtf8` when they are not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return NotUtf8(raw)


Value: TypeAlias = Marker | str | bytes
TupleData: TypeAlias = tuple[Value, ...]
OldKind: TypeAlias = Literal["K", "O"]

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
REPLICA_IDENTITIES = frozenset("dnfi")


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_ts: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        """True when the column is part of the relation's replica identity."""
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Type:
    oid: int
    namespace: str
    name: str
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Insert:
    relation_oid: int
    new: TupleData
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Update:
    relation_oid: int
    old: TupleData | None
    old_kind: OldKind | None
    new: TupleData
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    relation_oid: int
    old: TupleData
    old_kind: OldKind
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Truncate:
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """A logical decoding message, as written by `pg_logical_emit_message`."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class StreamStart:
    xid: int
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    pass


@dataclass(frozen=True, slots=True)
class StreamCommit:
    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: datetime


@dataclass(frozen=True, slots=True)
class StreamAbort:
    """Abort of a streamed (sub)transaction; LSN and time only with `streaming=parallel` (v4)."""

    xid: int
    subxid: int
    abort_lsn: int | None = None
    abort_ts: datetime | None = None


Event: TypeAlias = (
    Begin
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | Message
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
)

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")


class _Reader:
    """A cursor over one message; every read checks the length first."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def _unpack(self, fmt: struct.Struct, what: str) -> int:
        if self.remaining < fmt.size:
            raise DecodeError(
                f"message too short: {what} needs {fmt.size} bytes at offset {self.pos}, "
                f"{self.remaining} left"
            )
        (value,) = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return int(value)

    def u8(self, what: str) -> int:
        return self._unpack(_U8, what)

    def u16(self, what: str) -> int:
        return self._unpack(_U16, what)

    def i32(self, what: str) -> int:
        return self._unpack(_I32, what)

    def u32(self, what: str) -> int:
        return self._unpack(_U32, what)

    def u64(self, what: str) -> int:
        return self._unpack(_U64, what)

    def timestamp(self, what: str) -> datetime:
        micros = self._unpack(_I64, what)
        try:
            return PG_EPOCH + timedelta(microseconds=micros)
        except OverflowError:
            raise DecodeError(f"{what} {micros} is out of datetime range") from None

    def flag(self, what: str) -> bool:
        value = self.u8(what)
        if value > 1:
            raise DecodeError(f"{what} must be 0 or 1, got {value}")
        return bool(value)

    def raw(self, n: int, what: str) -> bytes:
        if n < 0 or self.remaining < n:
            raise DecodeError(
                f"bad length for {what}: {n} at offset {self.pos}, {self.remaining} bytes left"
            )
        start = self.pos
        self.pos += n
        return self.data[start : self.pos]

    def string(self, what: str) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise DecodeError(f"unterminated string for {what} at offset {self.pos}")
        raw = self.data[self.pos : end]
        self.pos = end + 1
        return _utf8(raw, what)

    def finish(self, kind: str) -> None:
        if self.remaining:
            raise DecodeError(f"{self.remaining} trailing bytes after {kind} message")


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what} is not valid UTF-8: {exc.reason} at byte {exc.start}") from None


def _tuple(r: _Reader) -> TupleData:
    count = r.u16("column count")
    if count > r.remaining:  # each column takes at least its kind byte
        raise DecodeError(f"tuple claims {count} columns but only {r.remaining} bytes follow")
    values: list[Value] = []
    for i in range(count):
        kind = r.u8("column kind")
        if kind == 0x6E:  # 'n'
            values.append(NULL)
        elif kind == 0x75:  # 'u'
            values.append(UNCHANGED)
        elif kind == 0x74:  # 't'
            values.append(text_value(r.raw(r.i32("value length"), "column value")))
        elif kind == 0x62:  # 'b'
            values.append(r.raw(r.i32("value length"), f"column {i} value"))
        else:
            raise DecodeError(f"unknown column kind {kind!r} for column {i}")
    return tuple(values)


def _expect(r: _Reader, expected: bytes, what: str) -> None:
    got = r.u8(what)
    if got != expected[0]:
        raise DecodeError(f"expected {expected!r} before {what}, got {bytes([got])!r}")


def _xid(r: _Reader, in_stream: bool) -> int | None:
    return r.u32("xid") if in_stream else None


def _begin(r: _Reader, in_stream: bool) -> Begin:
    return Begin(r.u64("final LSN"), r.timestamp("commit timestamp"), r.u32("xid"))


def _commit(r: _Reader, in_stream: bool) -> Commit:
    return Commit(
        r.u8("flags"), r.u64("commit LSN"), r.u64("end LSN"), r.timestamp("commit timestamp")
    )


def _origin(r: _Reader, in_stream: bool) -> Origin:
    return Origin(r.u64("origin commit LSN"), r.string("origin name"))


def _relation(r: _Reader, in_stream: bool) -> Relation:
    xid = _xid(r, in_stream)
    oid = r.u32("relation oid")
    namespace, name = r.string("namespace"), r.string("relation name")
    identity = chr(r.u8("replica identity"))
    if identity not in REPLICA_IDENTITIES:
        raise DecodeError(f"unknown replica identity {identity!r}")
    count = r.u16("column count")
    if count * 10 > r.remaining:  # flags + NUL + type oid + typmod at least
        raise DecodeError(f"relation claims {count} columns but only {r.remaining} bytes follow")
    columns = tuple(
        Column(r.u8("column flags"), r.string("column name"), r.u32("type oid"), r.i32("typmod"))
        for _ in range(count)
    )
    return Relation(oid, namespace, name, identity, columns, xid)


def _type(r: _Reader, in_stream: bool) -> Type:
    xid = _xid(r, in_stream)
    return Type(r.u32("type oid"), r.string("type namespace"), r.string("type name"), xid)


def _insert(r: _Reader, in_stream: bool) -> Insert:
    xid = _xid(r, in_stream)
    oid = r.u32("relation oid")
    _expect(r, b"N", "new tuple")
    return Insert(oid, _tuple(r), xid)


def _old_kind(r: _Reader) -> OldKind:
    kind = r.u8("old tuple kind")
    if kind == 0x4B:
        return "K"
    if kind == 0x4F:
        return "O"
    raise DecodeError(f"expected 'K' or 'O' before old tuple, got {bytes([kind])!r}")


def _update(r: _Reader, in_stream: bool) -> Update:
    xid = _xid(r, in_stream)
    oid = r.u32("relation oid")
    old: TupleData | None = None
    old_kind: OldKind | None = None
    if r.remaining and r.data[r.pos] != 0x4E:  # anything but 'N' must start an old tuple
        old_kind = _old_kind(r)
        old = _tuple(r)
    _expect(r, b"N", "new tuple")
    return Update(oid, old, old_kind, _tuple(r), xid)


def _delete(r: _Reader, in_stream: bool) -> Delete:
    xid = _xid(r, in_stream)
    oid = r.u32("relation oid")
    kind = _old_kind(r)
    return Delete(oid, _tuple(r), kind, xid)


def _truncate(r: _Reader, in_stream: bool) -> Truncate:
    xid = _xid(r, in_stream)
    count = r.u32("relation count")
    options = r.u8("truncate options")
    if options & ~0b11:
        raise DecodeError(f"unknown truncate option bits {options:#x}")
    if count * 4 > r.remaining:
        raise DecodeError(f"truncate claims {count} relations but {r.remaining} bytes follow")
    oids = tuple(r.u32("relation oid") for _ in range(count))
    return Truncate(oids, bool(options & 1), bool(options & 2), xid)


def _message(r: _Reader, in_stream: bool) -> Message:
    xid = _xid(r, in_stream)
    transactional = r.flag("message flags")
    lsn = r.u64("message LSN")
    prefix = r.string("message prefix")
    content = r.raw(r.i32("content length"), "message content")
    return Message(transactional, lsn, prefix, content, xid)


def _stream_start(r: _Reader, in_stream: bool) -> StreamStart:
    return StreamStart(r.u32("xid"), r.flag("first segment"))


def _stream_stop(r: _Reader, in_stream: bool) -> StreamStop:
    return StreamStop()


def _stream_commit(r: _Reader, in_stream: bool) -> StreamCommit:
    return StreamCommit(
        r.u32("xid"),
        r.u8("flags"),
        r.u64("commit LSN"),
        r.u64("end LSN"),
        r.timestamp("commit timestamp"),
    )


def _stream_abort(r: _Reader, in_stream: bool) -> StreamAbort:
    xid, subxid = r.u32("xid"), r.u32("subtransaction xid")
    if not r.remaining:
        return StreamAbort(xid, subxid)
    return StreamAbort(xid, subxid, r.u64("abort LSN"), r.timestamp("abort timestamp"))


_DECODERS = {
    b"B"[0]: _begin,
    b"C"[0]: _commit,
    b"O"[0]: _origin,
    b"R"[0]: _relation,
    b"Y"[0]: _type,
    b"I"[0]: _insert,
    b"U"[0]: _update,
    b"D"[0]: _delete,
    b"T"[0]: _truncate,
    b"M"[0]: _message,
    b"S"[0]: _stream_start,
    b"E"[0]: _stream_stop,
    b"c"[0]: _stream_commit,
    b"A"[0]: _stream_abort,
}


def decode(data: bytes, *, in_stream: bool = False) -> Event:
    """Decode one pgoutput message (an XLogData payload, or a row of `pg_logical_slot_*`).

    Pass `in_stream=True` between Stream Start and Stream Stop (protocol v2+): there,
    Relation, Type, Insert, Update, Delete, Truncate and Message carry the xid of the
    streamed transaction first. Raises `DecodeError` for anything malformed.
    """
    if not isinstance(data, bytes):
        if not isinstance(data, (bytearray, memoryview)):
            raise DecodeError(f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
    if not data:
        raise DecodeError("empty message")
    decoder = _DECODERS.get(data[0])
    if decoder is None:
        raise DecodeError(f"unknown message type {data[:1]!r}")
    r = _Reader(data)
    r.pos = 1
    event = decoder(r, in_stream)
    r.finish(type(event).__name__)
    return event
