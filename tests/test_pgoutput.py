"""The pgoutput decoder: byte fixtures per message, and fuzzing."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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
        (b"I" + struct.pack(">I", 7) + b"N\x00\x01t\x00\x00\x00\x02\xc3(", "UTF-8"),
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
