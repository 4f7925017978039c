"""The pgoutput decoder: byte fixtures per message, fuzzing, and a real server's output."""

from __future__ import annotations

import random
import struct
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb
from slipstream.worker.pgoutput import (
    NULL,
    UNCHANGED,
    Begin,
    Column,
    Commit,
    DecodeError,
    Delete,
    Event,
    Insert,
    Message,
    NotUtf8,
    Origin,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    Update,
    decode,
)
from slipstream.worker.pgtypes import ValueDecodeError, decode_text
from slipstream.worker.relations import RelationCache, TupleShapeError, UnknownRelationError

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
TS = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


# --- an encoder written from the protocol documentation, for fixtures -----------------


def micros(ts: datetime) -> int:
    return (ts - EPOCH) // timedelta(microseconds=1)


def cstr(s: str) -> bytes:
    return s.encode() + b"\x00"


def tuple_bytes(values: tuple) -> bytes:
    out = struct.pack(">H", len(values))
    for v in values:
        if v is NULL:
            out += b"n"
        elif v is UNCHANGED:
            out += b"u"
        elif isinstance(v, str):
            out += b"t" + struct.pack(">i", len(v.encode())) + v.encode()
        else:
            out += b"b" + struct.pack(">i", len(v)) + v
    return out


def encode(ev: Event) -> bytes:
    """The bytes pgoutput would send for `ev` (a streamed message when its xid is set)."""
    xid = struct.pack(">I", ev.xid) if getattr(ev, "xid", None) is not None else b""
    match ev:
        case Begin():
            return b"B" + struct.pack(">QqI", ev.final_lsn, micros(ev.commit_ts), ev.xid)
        case Commit():
            return b"C" + struct.pack(
                ">BQQq", ev.flags, ev.commit_lsn, ev.end_lsn, micros(ev.commit_ts)
            )
        case Origin():
            return b"O" + struct.pack(">Q", ev.commit_lsn) + cstr(ev.name)
        case Relation():
            cols = b"".join(
                struct.pack(">B", c.flags)
                + cstr(c.name)
                + struct.pack(">Ii", c.type_oid, c.type_modifier)
                for c in ev.columns
            )
            return (
                b"R"
                + xid
                + struct.pack(">I", ev.oid)
                + cstr(ev.namespace)
                + cstr(ev.name)
                + ev.replica_identity.encode()
                + struct.pack(">H", len(ev.columns))
                + cols
            )
        case Type():
            return b"Y" + xid + struct.pack(">I", ev.oid) + cstr(ev.namespace) + cstr(ev.name)
        case Insert():
            return b"I" + xid + struct.pack(">I", ev.relation_oid) + b"N" + tuple_bytes(ev.new)
        case Update():
            old = b"" if ev.old is None else ev.old_kind.encode() + tuple_bytes(ev.old)
            return (
                b"U" + xid + struct.pack(">I", ev.relation_oid) + old + b"N" + tuple_bytes(ev.new)
            )
        case Delete():
            return (
                b"D"
                + xid
                + struct.pack(">I", ev.relation_oid)
                + ev.old_kind.encode()
                + tuple_bytes(ev.old)
            )
        case Truncate():
            options = int(ev.cascade) | int(ev.restart_identity) << 1
            n = len(ev.relation_oids)
            return b"T" + xid + struct.pack(f">IB{n}I", n, options, *ev.relation_oids)
        case Message():
            return (
                b"M"
                + xid
                + struct.pack(">BQ", ev.transactional, ev.lsn)
                + cstr(ev.prefix)
                + struct.pack(">i", len(ev.content))
                + ev.content
            )
        case StreamStart():
            return b"S" + struct.pack(">IB", ev.xid, ev.first_segment)
        case StreamStop():
            return b"E"
        case StreamCommit():
            return b"c" + struct.pack(
                ">IBQQq", ev.xid, ev.flags, ev.commit_lsn, ev.end_lsn, micros(ev.commit_ts)
            )
        case StreamAbort():
            tail = b""
            if ev.abort_lsn is not None:
                tail = struct.pack(">Qq", ev.abort_lsn, micros(ev.abort_ts))
            return b"A" + struct.pack(">II", ev.xid, ev.subxid) + tail
    raise AssertionError(ev)


STREAMABLE = (Relation, Type, Insert, Update, Delete, Truncate, Message)


def in_stream(ev: Event) -> bool:
    return isinstance(ev, STREAMABLE) and ev.xid is not None


# --- byte fixtures, one (or more) per message type ----------------------------------------

COLUMNS = (Column(1, "id", 23, -1), Column(0, "title", 25, -1), Column(0, "body", 25, -1))
FIXTURES: list[tuple[bytes, Event]] = [
    (
        b"B" + struct.pack(">QqI", 0x16B3748, micros(TS), 735),
        Begin(0x16B3748, TS, 735),
    ),
    (
        b"C\x00" + struct.pack(">QQq", 0x16B3748, 0x16B3778, micros(TS)),
        Commit(0, 0x16B3748, 0x16B3778, TS),
    ),
    (b"O" + struct.pack(">Q", 2**64 - 1) + b"node_a\x00", Origin(2**64 - 1, "node_a")),
    (
        b"R"
        + struct.pack(">I", 16385)
        + b"public\x00items\x00d"
        + struct.pack(">H", 3)
        + b"\x01id\x00"
        + struct.pack(">Ii", 23, -1)
        + b"\x00title\x00"
        + struct.pack(">Ii", 25, -1)
        + b"\x00body\x00"
        + struct.pack(">Ii", 25, -1),
        Relation(16385, "public", "items", "d", COLUMNS),
    ),
    (
        b"R"
        + struct.pack(">II", 900, 16385)
        + b"\x00\xc3\xa9t\xc3\xa9\x00f"
        + struct.pack(">H", 1)
        + b"\x01v\x00"
        + struct.pack(">Ii", 1043, 24),
        Relation(16385, "", "été", "f", (Column(1, "v", 1043, 24),), xid=900),
    ),
    (b"Y" + struct.pack(">I", 16390) + b"public\x00mood\x00", Type(16390, "public", "mood")),
    (
        b"I"
        + struct.pack(">I", 16385)
        + b"N"
        + struct.pack(">H", 4)
        + b"t"
        + struct.pack(">i", 2)
        + b"42"
        + b"n"
        + b"u"
        + b"b"
        + struct.pack(">i", 3)
        + b"\x00\x01\xff",
        Insert(16385, ("42", NULL, UNCHANGED, b"\x00\x01\xff")),
    ),
    (
        b"I"
        + struct.pack(">II", 901, 7)
        + b"N"
        + struct.pack(">H", 1)
        + b"t"
        + struct.pack(">i", 0),
        Insert(7, ("",), xid=901),
    ),
    (
        b"U" + struct.pack(">I", 7) + b"N" + struct.pack(">H", 2) + b"t\x00\x00\x00\x01xu",
        Update(7, None, None, ("x", UNCHANGED)),
    ),
    (
        b"U"
        + struct.pack(">I", 7)
        + b"K"
        + struct.pack(">H", 2)
        + b"t\x00\x00\x00\x011n"
        + b"N"
        + struct.pack(">H", 2)
        + b"t\x00\x00\x00\x012n",
        Update(7, ("1", NULL), "K", ("2", NULL)),
    ),
    (
        b"U"
        + struct.pack(">II", 5, 7)
        + b"O"
        + struct.pack(">H", 1)
        + b"t\x00\x00\x00\x02ab"
        + b"N"
        + struct.pack(">H", 1)
        + b"t\x00\x00\x00\x02cd",
        Update(7, ("ab",), "O", ("cd",), xid=5),
    ),
    (
        b"D" + struct.pack(">I", 7) + b"K" + struct.pack(">H", 1) + b"t\x00\x00\x00\x0299",
        Delete(7, ("99",), "K"),
    ),
    (b"D" + struct.pack(">I", 7) + b"O" + struct.pack(">H", 0), Delete(7, (), "O")),
    (
        b"T" + struct.pack(">IBII", 2, 3, 7, 8),
        Truncate((7, 8), cascade=True, restart_identity=True),
    ),
    (b"T" + struct.pack(">IIBI", 9, 1, 2, 7), Truncate((7,), False, True, xid=9)),
    (
        b"M\x01" + struct.pack(">Q", 0x20) + b"slip\x00" + struct.pack(">i", 3) + b"a\x00b",
        Message(True, 0x20, "slip", b"a\x00b"),
    ),
    (
        b"M" + struct.pack(">IBQ", 44, 0, 0x21) + b"\x00" + struct.pack(">i", 0),
        Message(False, 0x21, "", b"", xid=44),
    ),
    (b"S" + struct.pack(">IB", 901, 1), StreamStart(901, True)),
    (b"S" + struct.pack(">IB", 901, 0), StreamStart(901, False)),
    (b"E", StreamStop()),
    (
        b"c" + struct.pack(">IBQQq", 901, 0, 0x30, 0x38, micros(TS)),
        StreamCommit(901, 0, 0x30, 0x38, TS),
    ),
    (b"A" + struct.pack(">II", 901, 902), StreamAbort(901, 902)),
    (
        b"A" + struct.pack(">IIQq", 901, 901, 0x40, micros(TS)),
        StreamAbort(901, 901, 0x40, TS),
    ),
]
FIXTURE_IDS = [f"{i}-{type(ev).__name__}" for i, (_, ev) in enumerate(FIXTURES)]


@pytest.mark.parametrize(("data", "expected"), FIXTURES, ids=FIXTURE_IDS)
def test_fixture_decodes_to_event(data: bytes, expected: Event) -> None:
    assert decode(data, in_stream=in_stream(expected)) == expected
    # The test's encoder agrees with the hand-written bytes, so the fuzz below is grounded.
    assert encode(expected) == data


def test_every_message_type_has_a_fixture() -> None:
    covered = {type(ev) for _, ev in FIXTURES}
    assert covered == set(Event.__args__)  # type: ignore[attr-defined]


def test_values_keep_their_kinds() -> None:
    ev = decode(FIXTURES[6][0])
    assert isinstance(ev, Insert)
    assert ev.new[0] == "42" and isinstance(ev.new[0], str)
    assert ev.new[1] is NULL and ev.new[2] is UNCHANGED
    assert isinstance(ev.new[3], bytes)


def test_column_is_key_reads_flag_bit() -> None:
    assert COLUMNS[0].is_key and not COLUMNS[1].is_key


def test_timestamps_are_aware_utc() -> None:
    ev = decode(b"B" + struct.pack(">QqI", 1, -86_400_000_000, 1))
    assert ev == Begin(1, datetime(1999, 12, 31, tzinfo=UTC), 1)
    assert ev.commit_ts.tzinfo is UTC


def test_streamed_insert_read_as_unstreamed_is_rejected() -> None:
    # With the xid taken as the relation OID, the 'N' is missing: a wrong in_stream is caught.
    with pytest.raises(DecodeError):
        decode(FIXTURES[7][0], in_stream=False)


@pytest.mark.parametrize(("data", "expected"), FIXTURES, ids=FIXTURE_IDS)
def test_every_truncation_raises_decode_error(data: bytes, expected: Event) -> None:
    for cut in range(len(data)):
        if isinstance(expected, StreamAbort) and cut == 9:  # the v2 form, without v4's fields
            assert decode(data[:cut]) == StreamAbort(expected.xid, expected.subxid)
            continue
        with pytest.raises(DecodeError):
            decode(data[:cut], in_stream=in_stream(expected))


@pytest.mark.parametrize(("data", "expected"), FIXTURES, ids=FIXTURE_IDS)
def test_trailing_bytes_raise_decode_error(data: bytes, expected: Event) -> None:
    # A Stream Abort's extra byte reads as the start of a truncated v4 abort LSN.
    short_abort = isinstance(expected, StreamAbort) and expected.abort_lsn is None
    with pytest.raises(DecodeError, match="too short" if short_abort else "trailing"):
        decode(data + b"\x00", in_stream=in_stream(expected))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"Z", "unknown message type"),
        (b"b" + bytes(40), "unknown message type"),  # Begin Prepare: two-phase is not supported
        (b"Y" + struct.pack(">I", 1) + b"public\x00mood", "unterminated"),
        (b"Y" + struct.pack(">I", 1) + b"\xff\xfe\x00mood\x00", "UTF-8"),
        (b"I" + struct.pack(">I", 7) + b"X\x00\x00", "expected b'N'"),
        (b"I" + struct.pack(">I", 7) + b"N\x00\x01x", "unknown column kind"),
        (b"I" + struct.pack(">I", 7) + b"N\x00\x01t\xff\xff\xff\xff", "bad length"),
        (b"I" + struct.pack(">I", 7) + b"N\xff\xff" + b"n" * 10, "claims 65535 columns"),
        (b"D" + struct.pack(">I", 7) + b"N\x00\x00", "'K' or 'O'"),
        (b"U" + struct.pack(">I", 7) + b"Q\x00\x00N\x00\x00", "'K' or 'O'"),
        (b"T" + struct.pack(">IBI", 3, 0, 7), "claims 3 relations"),
        (b"T" + struct.pack(">IBI", 1, 4, 7), "option bits"),
        (b"R" + struct.pack(">I", 1) + b"a\x00b\x00x\x00\x00", "replica identity"),
        (b"R" + struct.pack(">I", 1) + b"a\x00b\x00d\x00\x05\x01", "claims 5 columns"),
        (b"M\x02" + bytes(8) + b"p\x00" + bytes(4), "0 or 1"),
        (b"M\x01" + bytes(8) + b"p\x00" + struct.pack(">i", -1), "bad length"),
        (b"S" + struct.pack(">IB", 1, 2), "0 or 1"),
        (b"A" + struct.pack(">IIQ", 1, 1, 5), "too short"),
        (b"B" + struct.pack(">QqI", 1, 2**63 - 1, 1), "out of datetime range"),
    ],
)
def test_malformed_messages_raise_decode_error(data: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode(data)


def test_a_text_value_that_is_not_utf8_decodes_as_not_utf8() -> None:
    """A SQL_ASCII database sends any bytes: the message decodes, the value is marked, and
    reading it as any type refuses it (its row becomes a dead letter, not the stream)."""
    event = decode(b"I" + struct.pack(">I", 7) + b"N\x00\x02t\x00\x00\x00\x04caf\xe9t\x00\x00\x00\x02ok")
    value, plain = event.new
    assert isinstance(value, NotUtf8) and value == "caf\\xe9" and value.raw == b"caf\xe9"
    assert type(plain) is str and plain == "ok"
    for oid in (25, 1009, 3802, 0):  # text, text[], jsonb, a type the decoder does not know
        with pytest.raises(ValueDecodeError, match="not UTF-8"):
            decode_text(oid, value)


def test_bytes_like_input_is_accepted_and_other_types_rejected() -> None:
    data, expected = FIXTURES[0]
    assert decode(bytearray(data)) == expected
    assert decode(memoryview(data)) == expected
    with pytest.raises(DecodeError):
        decode("B")  # type: ignore[arg-type]


def test_decode_error_is_a_slipstream_error() -> None:
    from slipstream.index.errors import SlipstreamError

    assert issubclass(DecodeError, SlipstreamError)


# --- hypothesis: valid messages round-trip; anything else only ever raises DecodeError ----

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
names = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=12)
stamps = st.datetimes(
    min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)
)
values = st.one_of(st.just(NULL), st.just(UNCHANGED), names, st.binary(max_size=12))
tuples = st.lists(values, max_size=6).map(tuple)
xids = st.none() | u32
old_kinds = st.sampled_from(["K", "O"])
columns = st.builds(Column, st.integers(0, 255), names, u32, st.integers(-(2**31), 2**31 - 1))

events = st.one_of(
    st.builds(Begin, u64, stamps, u32),
    st.builds(Commit, st.integers(0, 255), u64, u64, stamps),
    st.builds(Origin, u64, names),
    st.builds(
        Relation,
        u32,
        names,
        names,
        st.sampled_from("dnfi"),
        st.lists(columns, max_size=4).map(tuple),
        xids,
    ),
    st.builds(Type, u32, names, names, xids),
    st.builds(Insert, u32, tuples, xids),
    st.one_of(
        st.builds(Update, u32, st.none(), st.none(), tuples, xids),
        st.builds(Update, u32, tuples, old_kinds, tuples, xids),
    ),
    st.builds(Delete, u32, tuples, old_kinds, xids),
    st.builds(Truncate, st.lists(u32, max_size=4).map(tuple), st.booleans(), st.booleans(), xids),
    st.builds(Message, st.booleans(), u64, names, st.binary(max_size=20), xids),
    st.builds(StreamStart, u32, st.booleans()),
    st.just(StreamStop()),
    st.builds(StreamCommit, u32, st.integers(0, 255), u64, u64, stamps),
    st.builds(StreamAbort, u32, u32),
    st.builds(StreamAbort, u32, u32, u64, stamps),
)


@settings(max_examples=500, deadline=None)
@given(events)
def test_valid_messages_round_trip(ev: Event) -> None:
    assert decode(encode(ev), in_stream=in_stream(ev)) == ev


def decodes_or_raises_decode_error(data: bytes, stream: bool) -> Event | None:
    try:
        return decode(data, in_stream=stream)
    except DecodeError:
        return None


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=64), st.booleans())
def test_random_bytes_only_raise_decode_error(data: bytes, stream: bool) -> None:
    decodes_or_raises_decode_error(data, stream)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.booleans())
def test_random_bytes_behind_a_valid_type_byte_only_raise_decode_error(
    body: bytes, stream: bool
) -> None:
    for kind in b"BCORYIUDTMSEcA":
        decodes_or_raises_decode_error(bytes([kind]) + body, stream)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bool]:
    ev = draw(events)
    data = bytearray(encode(ev))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and data:
            del data[at]
        elif op == "truncate":
            del data[at:]
    return bytes(data), draw(st.booleans())


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_messages_only_raise_decode_error(case: tuple[bytes, bool]) -> None:
    decodes_or_raises_decode_error(*case)


# --- RelationCache ------------------------------------------------------------------------


def test_relation_cache_builds_rows_with_markers_and_keys() -> None:
    cache = RelationCache()
    cache.add(Relation(7, "public", "items", "d", COLUMNS))
    assert 7 in cache and cache.key_columns(7) == ("id",)
    assert cache.new_row(Insert(7, ("42", NULL, "x"))) == {"id": 42, "title": None, "body": "x"}
    update = Update(7, ("41", NULL, NULL), "K", ("42", "t", UNCHANGED))
    assert cache.new_row(update) == {"id": 42, "title": "t", "body": UNCHANGED}
    assert cache.old_row(update) == {"id": 41}
    assert cache.old_row(Update(7, None, None, ("1", "a", "b"))) is None
    assert cache.key(Delete(7, ("5", NULL, NULL), "K")) == {"id": 5}


def test_relation_cache_full_old_row_and_binary_values() -> None:
    cache = RelationCache()
    cache.add(
        Relation(7, "public", "items", "f", (Column(1, "id", 23, -1), Column(1, "b", 17, -1)))
    )
    delete = Delete(7, ("3", b"\x00raw"), "O")
    assert cache.old_row(delete) == {"id": 3, "b": b"\x00raw"}


def test_relation_cache_later_relation_replaces_earlier() -> None:
    cache = RelationCache()
    cache.add(Relation(7, "public", "items", "d", COLUMNS))
    cache.add(Relation(7, "public", "items", "d", (*COLUMNS[:2], Column(0, "extra", 20, -1))))
    assert cache.new_row(Insert(7, ("1", "a", "99"))) == {"id": 1, "title": "a", "extra": 99}
    with pytest.raises(TupleShapeError, match="has 4 columns"):
        cache.new_row(Insert(7, ("1", "a", "99", "x")))


def test_relation_cache_unknown_oid_is_a_typed_error() -> None:
    cache = RelationCache()
    with pytest.raises(UnknownRelationError, match="OID 99") as info:
        cache.new_row(Insert(99, ("1",)))
    assert info.value.oid == 99
    assert isinstance(info.value, DecodeError)


# --- a real server's output ----------------------------------------------------------------


def slot_messages(conn: psycopg.Connection, slot: str, *options: str) -> list[bytes]:
    rows = conn.execute(
        "SELECT data FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL, VARIADIC %s)",
        (slot, list(options)),
    ).fetchall()
    return [bytes(r[0]) for r in rows]


def decode_stream(chunks: list[bytes]) -> list[Event]:
    """Decode a slot's output in order, tracking Stream Start/Stop as a client must."""
    events: list[Event] = []
    streaming = False
    for data in chunks:
        ev = decode(data, in_stream=streaming)
        if isinstance(ev, StreamStart):
            streaming = True
        elif isinstance(ev, StreamStop):
            streaming = False
        events.append(ev)
    return events


def replay(events: list[Event]) -> list[tuple]:
    """Changes as (op, table, old row, new row), decoded through a RelationCache."""
    cache = RelationCache()
    out: list[tuple] = []
    for ev in events:
        if isinstance(ev, Relation):
            cache.add(ev)
        elif isinstance(ev, Insert):
            out.append(("I", cache.get(ev.relation_oid).name, None, cache.new_row(ev)))
        elif isinstance(ev, Update):
            rel = cache.get(ev.relation_oid).name
            out.append(("U", rel, cache.old_row(ev), cache.new_row(ev)))
        elif isinstance(ev, Delete):
            out.append(("D", cache.get(ev.relation_oid).name, cache.old_row(ev), None))
        elif isinstance(ev, Truncate):
            rels = sorted(cache.get(oid).name for oid in ev.relation_oids)
            out.append(("T", tuple(rels), ev.cascade, ev.restart_identity))
    return out


@pytest.fixture
def conn(pg_dsn: str):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        # The test server runs with synchronous_commit=off, and the slot functions read only
        # WAL that is flushed: without this, the last commits may not be decoded yet.
        conn.execute("SET synchronous_commit = on")
        yield conn


def new_slot(conn: psycopg.Connection) -> str:
    slot = f"s_{uuid.uuid4().hex[:10]}"
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    return slot


def test_real_server_changes_decode_to_what_was_written(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TYPE mood AS ENUM ('happy', 'sad')")
    conn.execute(
        """CREATE TABLE items (
            id int PRIMARY KEY, big bigint, price numeric, ratio float8, ok bool, title text,
            label varchar(20), doc jsonb, at timestamptz, at_local timestamp, day date,
            uid uuid, blob bytea, nums int[], tags text[], grid int[], feeling mood, body text)"""
    )
    conn.execute("ALTER TABLE items ALTER COLUMN body SET STORAGE EXTERNAL")
    conn.execute("CREATE TABLE audit (n int, note text)")
    conn.execute("ALTER TABLE audit REPLICA IDENTITY FULL")
    conn.execute("CREATE PUBLICATION pub FOR TABLE items, audit")
    slot = new_slot(conn)

    body = "".join(random.Random(7).choices("abcdefghij klmnop", k=20_000))
    row1 = {
        "id": 1,
        "big": -(2**62),
        "price": Decimal("12345.678900"),
        "ratio": 0.1,
        "ok": True,
        "title": 'héllo, "world"',
        "label": "x" * 20,
        "doc": {"a": [1, 2.5, None], "b": "ü"},
        "at": datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
        "at_local": datetime(1999, 12, 31, 23, 59, 59),
        "day": date(2024, 2, 29),
        "uid": uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        "blob": b"\x00\x01\xfe\xff",
        "nums": [1, None, -3],
        "tags": ["a b", 'c"d', "back\\slash", "NULL", "", None, "{x}", "a,b"],
        "grid": [[1, 2], [3, 4]],
        "feeling": "happy",
        "body": body,
    }
    insert = "INSERT INTO items ({}) VALUES ({})".format(
        ", ".join(row1), ", ".join(["%s"] * len(row1))
    )
    conn.execute(insert, [Jsonb(v) if k == "doc" else v for k, v in row1.items()])
    conn.execute("INSERT INTO items (id) VALUES (2)")
    conn.execute("UPDATE items SET title = 'changed', nums = '{}' WHERE id = 1")
    conn.execute("UPDATE items SET id = 3 WHERE id = 2")
    conn.execute("SELECT pg_logical_emit_message(true, 'slip', 'in a transaction')")
    conn.execute("SELECT pg_logical_emit_message(false, 'slip', '\\x00ff'::bytea)")
    conn.execute("ALTER TABLE items ADD COLUMN extra int DEFAULT 7")
    conn.execute("UPDATE items SET ok = false WHERE id = 1")
    conn.execute("ALTER TABLE items DROP COLUMN label")
    conn.execute("INSERT INTO items (id, extra) VALUES (4, 42)")
    conn.execute("DELETE FROM items WHERE id = 3")
    conn.execute("INSERT INTO audit VALUES (1, 'one')")
    conn.execute("UPDATE audit SET note = 'uno'")
    conn.execute("DELETE FROM audit")
    conn.execute("TRUNCATE items, audit RESTART IDENTITY")

    conn.execute("SET TimeZone = 'Asia/Kolkata'")  # timestamptz arrives as '...+05:30'
    events = decode_stream(
        slot_messages(
            conn, slot, "proto_version", "1", "publication_names", "pub", "messages", "true"
        )
    )

    begins = [e for e in events if isinstance(e, Begin)]
    commits = [e for e in events if isinstance(e, Commit)]
    # One per transaction that changed a published table or emitted a transactional
    # message; pgoutput sends nothing for the DDL-only ones.
    assert len(begins) == len(commits) == 12
    assert all(b.final_lsn == c.commit_lsn for b, c in zip(begins, commits, strict=True))
    assert [c.commit_lsn for c in commits] == sorted(c.commit_lsn for c in commits)
    assert all(b.commit_ts.tzinfo is UTC for b in begins)
    assert all(e.xid is None for e in events if isinstance(e, STREAMABLE))

    # A Type message for the enum goes before each Relation message of the table using it.
    types = [(t.namespace, t.name) for t in events if isinstance(t, Type)]
    assert types and set(types) == {("public", "mood")}
    item_relations = [e for e in events if isinstance(e, Relation) and e.name == "items"]
    shapes = [[c.name for c in r.columns] for r in item_relations]
    assert shapes[0] == list(row1)
    assert shapes[-1] == [c for c in row1 if c != "label"] + ["extra"]
    assert any("extra" in s and "label" in s for s in shapes)
    assert item_relations[0].replica_identity == "d"
    assert [c.name for c in item_relations[0].columns if c.is_key] == ["id"]

    messages = [e for e in events if isinstance(e, Message)]
    assert [(m.transactional, m.prefix, m.content) for m in messages] == [
        (True, "slip", b"in a transaction"),
        (False, "slip", b"\x00\xff"),
    ]

    nulls = {k: None for k in row1 if k != "id"}
    changed = {**row1, "title": "changed", "nums": [], "body": UNCHANGED}
    assert replay(events) == [
        ("I", "items", None, row1),
        ("I", "items", None, {**nulls, "id": 2}),
        ("U", "items", None, changed),  # the TOASTed body was not touched: 'u'
        ("U", "items", {"id": 2}, {**nulls, "id": 3}),
        ("U", "items", None, {**changed, "ok": False, "extra": 7}),
        ("I", "items", None, {**{k: None for k in row1 if k != "label"}, "id": 4, "extra": 42}),
        ("D", "items", {"id": 3}, None),
        ("I", "audit", None, {"n": 1, "note": "one"}),
        ("U", "audit", {"n": 1, "note": "one"}, {"n": 1, "note": "uno"}),
        ("D", "audit", {"n": 1, "note": "uno"}, None),
        ("T", ("audit", "items"), False, True),
    ]
    update = next(e for e in events if isinstance(e, Update))
    assert update.new[-1] is UNCHANGED


def test_real_server_streams_large_transactions_in_protocol_v2(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, payload text)")
    conn.execute("CREATE PUBLICATION pub FOR TABLE big")
    slot = new_slot(conn)
    fill = "INSERT INTO big SELECT g, repeat(%s, 100) FROM generate_series(%s::int, %s::int) g"
    with conn.transaction():
        conn.execute(fill, ("x", 1, 1000))
        # A subtransaction streamed before its rollback is decoded: a Stream Abort.
        # (A whole transaction already aborted when decoding reaches it is not streamed.)
        with conn.transaction():
            conn.execute(fill, ("y", 1001, 4000))
            raise psycopg.Rollback()
        conn.execute(fill, ("x", 1001, 3000))
    conn.execute("INSERT INTO big VALUES (0, 'small')")

    conn.execute("SET logical_decoding_work_mem = '64kB'")
    events = decode_stream(
        slot_messages(
            conn, slot, "proto_version", "2", "publication_names", "pub", "streaming", "on"
        )
    )

    starts = [e for e in events if isinstance(e, StreamStart)]
    assert len(starts) >= 2 and starts[0].first_segment and not starts[-1].first_segment
    assert sum(isinstance(e, StreamStop) for e in events) == len(starts)
    committed = next(e for e in events if isinstance(e, StreamCommit))
    aborted = next(e for e in events if isinstance(e, StreamAbort))
    assert {s.xid for s in starts} == {committed.xid} == {aborted.xid}
    assert aborted.subxid != aborted.xid
    assert aborted.abort_lsn is None  # only with streaming = parallel
    assert committed.commit_ts.tzinfo is UTC
    assert all(
        isinstance(e, (Insert, Relation)) for e in events if isinstance(e, STREAMABLE) and e.xid
    )

    # Streamed changes carry their (sub)transaction's xid, so the rolled-back ones can go.
    streamed = [e for e in events if isinstance(e, Insert) and e.xid is not None]
    assert {e.xid for e in streamed} == {committed.xid, aborted.subxid}
    assert sum(e.xid == committed.xid for e in streamed) == 3000
    assert all(e.new[1] == "y" * 100 for e in streamed if e.xid == aborted.subxid)
    kept = [ev for ev in events if not (isinstance(ev, Insert) and ev.xid == aborted.subxid)]
    assert sorted(row[3]["id"] for row in replay(kept)) == list(range(3001))
    # The small transaction after it is not streamed: plain Begin, Insert, Commit.
    assert [type(e) for e in events[-3:]] == [Begin, Insert, Commit]
    assert events[-2].xid is None and events[-2].new == ("0", "small")
