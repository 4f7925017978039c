"""Text-format value decoding: known answers, errors, fuzzing, and a real server's text."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from slipstream.worker.pgoutput import DecodeError
from slipstream.worker.pgtypes import (
    ARRAY_ELEMENT,
    OID,
    OutOfRangeError,
    ValueDecodeError,
    decode_text,
    source_conninfo,
)

ARRAY = {element: array for array, element in ARRAY_ELEMENT.items()}
IST = timezone(timedelta(hours=5, minutes=30))

KNOWN = [
    ("int2", "-32768", -32768),
    ("int4", "2147483647", 2147483647),
    ("int8", "-9223372036854775808", -(2**63)),
    ("oid", "4294967295", 2**32 - 1),
    ("numeric", "12345.678900", Decimal("12345.678900")),
    ("numeric", "-0.5", Decimal("-0.5")),
    ("numeric", "Infinity", Decimal("Infinity")),
    ("numeric", "-Infinity", Decimal("-Infinity")),
    ("float8", "0.1", 0.1),
    ("float8", "-1e+300", -1e300),
    ("float4", "Infinity", math.inf),
    ("float4", "-Infinity", -math.inf),
    ("bool", "t", True),
    ("bool", "f", False),
    ("text", "héllo\n\\", "héllo\n\\"),
    ("varchar", "", ""),
    ("bpchar", "ab  ", "ab  "),
    ("name", "pg_class", "pg_class"),
    ("char", "x", "x"),
    ("json", '{"a": [1, 2.5, null]}', {"a": [1, 2.5, None]}),
    ("jsonb", '"just a string"', "just a string"),
    ("timestamptz", "2024-01-02 03:04:05.123456+00", datetime(2024, 1, 2, 3, 4, 5, 123456, UTC)),
    ("timestamptz", "2024-01-02 08:34:05.5+05:30", datetime(2024, 1, 2, 8, 34, 5, 500000, IST)),
    (
        "timestamptz",
        "1883-11-18 12:00:00-07:52:58",
        datetime(1883, 11, 18, 12, tzinfo=timezone(-timedelta(hours=7, minutes=52, seconds=58))),
    ),
    ("timestamptz", "infinity", datetime.max.replace(tzinfo=UTC)),
    ("timestamptz", "-infinity", datetime.min.replace(tzinfo=UTC)),
    ("timestamp", "1999-12-31 23:59:59", datetime(1999, 12, 31, 23, 59, 59)),
    ("timestamp", "infinity", datetime.max),
    ("date", "2024-02-29", date(2024, 2, 29)),
    ("date", "-infinity", date.min),
    ("time", "23:59:59.000001", time(23, 59, 59, 1)),
    ("timetz", "12:00:00-03", time(12, tzinfo=timezone(timedelta(hours=-3)))),
    (
        "uuid",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    ),
    ("bytea", "\\x", b""),
    ("bytea", "\\x00ff10", b"\x00\xff\x10"),
    ("bytea", "ab\\\\c\\000\\377", b"ab\\c\x00\xff"),  # bytea_output = escape
]


@pytest.mark.parametrize(("type_name", "text", "expected"), KNOWN)
def test_known_values(type_name: str, text: str, expected: object) -> None:
    value = decode_text(OID[type_name], text)
    assert value == expected and type(value) is type(expected)
    if isinstance(expected, datetime | time):
        assert value.utcoffset() == expected.utcoffset()


def test_nan_values() -> None:
    assert math.isnan(decode_text(OID["float8"], "NaN"))
    assert decode_text(OID["numeric"], "NaN").is_nan()


def test_aware_and_naive_timestamps() -> None:
    assert decode_text(OID["timestamptz"], "2024-01-02 03:04:05+00").tzinfo is not None
    assert decode_text(OID["timestamp"], "2024-01-02 03:04:05").tzinfo is None


@pytest.mark.parametrize(
    ("type_name", "text", "expected"),
    [
        ("int4", "{1,2,NULL}", [1, 2, None]),
        ("int4", "{}", []),
        ("int4", "{{1,2},{3,4}}", [[1, 2], [3, 4]]),
        ("int4", "[0:1]={7,8}", [7, 8]),
        ("int4", "{ 1 , 2 }", [1, 2]),
        ("text", '{"a b","c\\"d",NULL,"NULL",plain,""}', ["a b", 'c"d', None, "NULL", "plain", ""]),
        ("text", '{"back\\\\slash","{x}","a,b"}', ["back\\slash", "{x}", "a,b"]),
        ("text", "{null,\\NULL}", [None, "NULL"]),
        ("bool", "{t,f}", [True, False]),
        ("numeric", "{1.5,NaN}", [Decimal("1.5"), Decimal("NaN")]),
        ("jsonb", '{"{\\"a\\": 1}",NULL}', [{"a": 1}, None]),
        ("bytea", '{"\\\\x0102",NULL}', [b"\x01\x02", None]),
        ("date", "{2024-01-02,infinity}", [date(2024, 1, 2), date.max]),
        ("timestamptz", '{"2024-01-02 03:04:05+00"}', [datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)]),
        (
            "uuid",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            [uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")],
        ),
    ],
)
def test_arrays(type_name: str, text: str, expected: list) -> None:
    assert repr(decode_text(ARRAY[OID[type_name]], text)) == repr(expected)


def test_unknown_oids_keep_their_text() -> None:
    assert decode_text(1186, "1 day 02:00:00") == "1 day 02:00:00"  # interval
    assert decode_text(99999, "{not,parsed}") == "{not,parsed}"


@pytest.mark.parametrize(
    ("type_name", "text"),
    [
        ("int2", "32768"),
        ("int4", "1.0"),
        ("int4", " 1"),
        ("int4", "1_000"),
        ("int8", "١٢"),  # non-ASCII digits int() would accept
        ("oid", "-1"),
        ("numeric", "1e"),
        ("numeric", "sNaN"),
        ("numeric", ""),
        ("float8", "1.2.3"),
        ("float8", "infinit"),
        ("bool", "true"),
        ("json", "{"),
        ("json", "[" * 100_000),
        ("jsonb", "1" * 5000),  # past Python's int digit limit
        ("timestamptz", "2024-01-02 03:04:05"),
        ("timestamptz", "2024-01-02T03:04:05+00"),
        ("timestamptz", "2024-01-02 03:04:05+25"),
        ("timestamp", "2024-02-30 00:00:00"),
        ("timestamp", "2024-01-02 03:04:05.1234567"),
        ("date", "2024-1-2"),
        ("date", "0000-01-01"),
        ("time", "25:00:00"),
        ("timetz", "12:00:00"),
        ("uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1"),
        ("uuid", "+0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        ("bytea", "\\x0"),
        ("bytea", "\\xzz"),
        ("bytea", "\\x00 11"),
        ("bytea", "a\\9"),
        ("bytea", "é\u0100"),
    ],
)
def test_bad_text_raises_value_decode_error(type_name: str, text: str) -> None:
    with pytest.raises(ValueDecodeError) as info:
        decode_text(OID[type_name], text)
    assert info.value.type_oid == OID[type_name] and info.value.text == text
    assert not isinstance(info.value, OutOfRangeError)


@pytest.mark.parametrize(
    "text",
    [
        "{1,",
        "{1,,2}",
        "{,}",
        "{1}x",
        "1,2",
        "{1 2 {}",
        '{"a}',
        '{a"b}',
        "{{1}",
        "{1}}",
        "{1{2}}",
        "{" * 7 + "}" * 7,
        "{\\",
        "{a,}",
        "{{1},2",
    ],
)
def test_bad_array_text_raises_value_decode_error(text: str) -> None:
    with pytest.raises(ValueDecodeError):
        decode_text(ARRAY[OID["text"]], text)


def test_bad_array_element_raises_value_decode_error() -> None:
    with pytest.raises(ValueDecodeError, match="1007"):
        decode_text(ARRAY[OID["int4"]], "{1,x}")


@pytest.mark.parametrize(
    ("type_name", "text"),
    [
        ("timestamptz", "0044-03-15 12:00:00+00 BC"),
        ("timestamp", "0044-03-15 12:00:00 BC"),
        ("timestamp", "10000-01-01 00:00:00"),
        ("date", "0001-01-01 BC"),
        ("time", "24:00:00"),
    ],
)
def test_values_python_cannot_hold_raise_out_of_range(type_name: str, text: str) -> None:
    with pytest.raises(OutOfRangeError, match="out of Python's range"):
        decode_text(OID[type_name], text)


def test_errors_are_decode_errors() -> None:
    assert issubclass(OutOfRangeError, ValueDecodeError)
    assert issubclass(ValueDecodeError, DecodeError)


# --- fuzzing ----------------------------------------------------------------------------

ALL_OIDS = sorted({*OID.values(), *ARRAY_ELEMENT, 1186, 0})
tricky_text = st.text(
    alphabet='{}",\\ NULnul0123456789-+.:eEtfxabcdefinityINFTYaN[]=\x00é', max_size=40
)


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(ALL_OIDS), st.one_of(st.text(max_size=40), tricky_text))
def test_random_text_only_raises_decode_error(type_oid: int, text: str) -> None:
    try:
        decode_text(type_oid, text)
    except DecodeError:
        pass


def pg_array_text(items: list, quote_all: bool) -> str:
    """Array text the way Postgres writes it (or with every element quoted)."""
    parts = []
    for item in items:
        if isinstance(item, list):
            parts.append(pg_array_text(item, quote_all))
        elif item is None:
            parts.append("NULL")
        elif (
            quote_all
            or item == ""
            or item.upper() == "NULL"
            or any(c in item for c in '{},"\\ \t\n\r\v\f')
        ):
            parts.append('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"')
        else:
            parts.append(item)
    return "{" + ",".join(parts) + "}"


elements = st.none() | st.text(max_size=8)
arrays = st.one_of(
    st.lists(elements, max_size=5),
    st.lists(st.lists(elements, min_size=1, max_size=3), max_size=3),
    st.lists(
        st.lists(st.lists(elements, min_size=1, max_size=2), min_size=1, max_size=2), max_size=2
    ),
)


@settings(max_examples=500, deadline=None)
@given(arrays, st.booleans())
def test_text_arrays_round_trip(items: list, quote_all: bool) -> None:
    assert decode_text(ARRAY[OID["text"]], pg_array_text(items, quote_all)) == items


# --- against a real server ----------------------------------------------------------------


def test_type_oids_match_the_server(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT typname, oid::int, typarray::int FROM pg_type "
            "WHERE typnamespace = 'pg_catalog'::regnamespace AND typname = ANY(%s)",
            (list(OID),),
        ).fetchall()
    assert {name: oid for name, oid, _ in rows} == OID
    assert {array: oid for _, oid, array in rows} == ARRAY_ELEMENT


BYTEA_ARRAY = "ARRAY['\\x01'::bytea, '\\x'::bytea]"
EXPRESSIONS = [
    "(-32768)::int2",
    "2147483647::int4",
    "(-9223372036854775808)::int8",
    "4294967295::oid",
    "12345.678900::numeric",
    "'Infinity'::numeric",
    "0.1::float8",
    "1.1::float4",
    "1e-300::float8",
    "'-Infinity'::float8",
    "true",
    "'héllo \"x\"'::text",
    "'ab'::char(4)",
    "'x'::varchar",
    "'relname'::name",
    '\'{"a": [1, 2.5, null, "ü"]}\'::jsonb',
    "'[1, {\"b\": false}]'::json",
    "'2024-01-02 03:04:05.123456+00'::timestamptz",
    "'1850-06-01 00:00:00+00'::timestamptz",
    "'2024-01-02 03:04:05.5'::timestamp",
    "'2024-02-29'::date",
    "'13:14:15.000016'::time",
    "'13:14:15+02:30'::timetz",
    "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid",
    "'\\x00ff5c22'::bytea",
    "'{1,NULL,3}'::int4[]",
    "'{{1,2},{3,4}}'::int8[]",
    "ARRAY['a b', 'c\"d', 'back\\slash', 'NULL', '', NULL, '{x}', 'a,b']::text[]",
    'ARRAY[\'{"k": "v"}\'::jsonb, NULL]',
    BYTEA_ARRAY,
    "ARRAY['2024-01-02 03:04:05+00'::timestamptz]",
    "ARRAY[true, false, NULL]",
    "ARRAY[1.5, 'NaN']::numeric[]",
    "ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid]",
    "'[0:1]={5,6}'::int2[]",
    "ARRAY['x'::\"char\"]",
    "ARRAY[1.5::float4, 'Infinity']",
]


def same(a: object, b: object) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Decimal) and isinstance(b, Decimal) and a.is_nan():
        return b.is_nan()
    return type(a) is type(b) and a == b


def output_text(conn: psycopg.Connection, expr: str) -> tuple[str, int, object]:
    """The type output function's text for `expr` (what pgoutput sends), its OID, psycopg's value.

    Not `expr::text`: some casts to text differ from the output function (bool gives 'true').
    """
    cur = conn.execute(f"SELECT {expr}")
    loaded = cur.fetchone()[0]
    raw = cur.pgresult.get_value(0, 0)
    return bytes(raw).decode(), cur.description[0].type_code, loaded


@pytest.mark.parametrize("bytea_output", ["hex", "escape"])
def test_decoding_server_text_matches_psycopg(pg_dsn: str, bytea_output: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(
            "SET TimeZone = 'America/New_York'"
        )  # offsets like -05 and, in 1850, -04:56:02
        conn.execute(f"SET bytea_output = {bytea_output}")
        for expr in EXPRESSIONS:
            if bytea_output == "escape" and expr == BYTEA_ARRAY:
                continue  # psycopg misreads this one: see the next test
            text, oid, loaded = output_text(conn, expr)
            assert oid in ARRAY_ELEMENT or oid in OID.values(), expr
            assert same(decode_text(oid, text), loaded), (expr, text)


def test_escape_format_bytea_array_with_empty_element(pg_dsn: str) -> None:
    # psycopg 3.3's text loader reads the empty element below as b'"}'; our decoder must not.
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("SET bytea_output = escape")
        text, oid, _ = output_text(conn, BYTEA_ARRAY)
    assert text == '{"\\\\001",""}'
    assert decode_text(oid, text) == [b"\x01", b""]


def test_server_text_python_cannot_hold(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        for expr in [
            "'0044-03-15 12:00 BC'::timestamptz",
            "'20000-01-01'::timestamp",
            "'24:00'::time",
        ]:
            cur = conn.execute(f"SELECT {expr}, 1", binary=False)
            text, oid = bytes(cur.pgresult.get_value(0, 0)).decode(), cur.description[0].type_code
            with pytest.raises(OutOfRangeError):
                decode_text(oid, text)
        text = conn.execute("SELECT 'infinity'::timestamptz::text").fetchone()[0]
        assert decode_text(OID["timestamptz"], text) == datetime.max.replace(tzinfo=UTC)


def test_source_connections_pin_the_output_settings_after_the_dsns_own(monkeypatch) -> None:
    from psycopg.conninfo import conninfo_to_dict

    monkeypatch.delenv("PGOPTIONS", raising=False)
    plain = conninfo_to_dict(source_conninfo("postgresql://app@db/app"))
    assert plain["options"] == ("-c DateStyle=ISO -c IntervalStyle=postgres -c TimeZone=UTC "
                                "-c extra_float_digits=1 -c bytea_output=hex -c statement_timeout=0 "
                                "-c lock_timeout=0 -c idle_in_transaction_session_timeout=0 "
                                "-c row_security=off")
    assert (plain["host"], plain["user"], plain["dbname"]) == ("db", "app", "app")
    twice = conninfo_to_dict(source_conninfo(source_conninfo("postgresql://app@db/app")))
    assert twice["options"] == plain["options"]  # pinning a pinned DSN adds nothing
    env = conninfo_to_dict(source_conninfo("host=db"))
    assert env["options"] == plain["options"]
    monkeypatch.setenv("PGOPTIONS", "-c search_path=app")  # which an `options` would replace
    assert conninfo_to_dict(source_conninfo("host=db"))["options"] == "-c search_path=app " + plain["options"]
    own = conninfo_to_dict(source_conninfo("host=db options='-c search_path=app -c TimeZone=PST8PDT'"))
    assert own["options"].startswith("-c search_path=app -c TimeZone=PST8PDT -c DateStyle=ISO")
    assert own["options"].endswith("-c TimeZone=UTC -c extra_float_digits=1 -c bytea_output=hex "
                                   "-c statement_timeout=0 -c lock_timeout=0 "
                                   "-c idle_in_transaction_session_timeout=0 -c row_security=off")


def test_type_aliases_read_domains_as_their_base_and_unknown_arrays_as_text_arrays(pg_dsn: str) -> None:
    from slipstream.worker.typealias import type_aliases

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TYPE mood AS ENUM ('sad', 'happy'); "
                     "CREATE DOMAIN posint AS integer CHECK (VALUE > 0); "
                     "CREATE DOMAIN small AS posint CHECK (VALUE < 10); "
                     "CREATE DOMAIN nets AS inet[]; CREATE DOMAIN label AS mood")
        oid = {name: conn.execute("SELECT %s::regtype::oid::int", (name,)).fetchone()[0]
               for name in ("posint", "small", "posint[]", "small[]", "mood[]", "inet[]", "nets",
                            "label", "mood", "box[]", "oidvector", "int2vector", "vector")}
        aliases = type_aliases(conn)
    assert aliases[oid["posint"]] == aliases[oid["small"]] == OID["int4"]
    assert aliases[oid["posint[]"]] == aliases[oid["small[]"]] == ARRAY[OID["int4"]]
    assert aliases[oid["mood[]"]] == aliases[oid["inet[]"]] == aliases[oid["nets"]] == ARRAY[OID["text"]]
    assert aliases[oid["label"]] == oid["mood"]  # a domain over an enum: the enum, read as text
    # Not aliased: known arrays, ';'-delimited arrays, and vector types that are not arrays.
    for name in ("box[]", "oidvector", "int2vector", "vector", "mood"):
        assert oid[name] not in aliases, name
    assert not set(aliases) & set(ARRAY_ELEMENT)
    assert decode_text(aliases[oid["inet[]"]], '{10.0.0.1,NULL,"a,b"}') == ["10.0.0.1", None, "a,b"]
