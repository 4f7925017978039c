"""Text-format column values to Python values, chosen by the column's type OID.

This module owns how a value that pgoutput sent in text format becomes a Python
object: `decode_text(type_oid, text)`. The text of a value depends on the session's output
settings, which a database or role may set to anything (`ALTER DATABASE … SET
DateStyle = 'SQL, DMY'`); every connection that reads source values therefore
pins them with `source_conninfo` (`OUTPUT_SETTINGS`: ISO dates, `postgres`
intervals, UTC, shortest exact floats, hex bytea), so a row reads the same through
the copy and the stream, whatever the server's configuration. Values arrive as UTF-8
whatever the database's encoding (the connections ask for it, and the server
converts), except in a SQL_ASCII database, which converts nothing: there the copy
and the stream take the bytes as they are, and a value that is not UTF-8 is
refused here, as its row's dead letter.

| Postgres type                          | Python                                   |
| -------------------------------------- | ---------------------------------------- |
| int2, int4, int8, oid                  | int (range-checked)                      |
| numeric                                | Decimal, incl. NaN and ±Infinity         |
| float4, float8                         | float, incl. nan and ±inf                |
| bool                                   | bool                                     |
| text, varchar, bpchar, name, "char"    | str, unchanged                           |
| json, jsonb                            | `json.loads` result (numbers as float)   |
| timestamp / timestamptz                | naive / aware datetime                   |
| date, time, timetz                     | date, time, aware time                   |
| uuid                                   | uuid.UUID                                |
| bytea (hex or escape output)           | bytes                                    |
| one- or many-dimensional arrays of any of these | (nested) list, NULL → None      |
| any other OID                          | the text, unchanged                      |

Infinite dates and timestamps ('infinity', '-infinity') become the extreme
values Python has: `date.max`/`date.min`, `datetime.max`/`datetime.min` (with
`tzinfo=UTC` for timestamptz). A finite value equal to those extremes reads the
same: the ambiguity is accepted so that a column always yields one Python type.
Values Python cannot hold (years BC or after 9999, time '24:00:00') raise
`OutOfRangeError`; other text that is not valid for its type, or whose bytes were
not UTF-8 (`pgoutput.NotUtf8`), raises `ValueDecodeError`. Both are `DecodeError`s; no other exception escapes.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from functools import partial

from slipstream.index.pg_connect import NO_TIMEOUTS, SESSION_SETTINGS, pinned_conninfo

from .pgoutput import DecodeError, NotUtf8

__all__ = ["ARRAY_ELEMENT", "OID", "OUTPUT_SETTINGS", "OutOfRangeError", "ValueDecodeError",
           "decode_text", "decodes", "source_conninfo"]

# The session settings a value's text depends on, as the decoder expects them: the ones
# every slipstream connection pins (ISO dates, `postgres` intervals), and more.
OUTPUT_SETTINGS = SESSION_SETTINGS + (("TimeZone", "UTC"), ("extra_float_digits", "1"),
                                      ("bytea_output", "hex"))


def source_conninfo(dsn: str) -> str:
    """`dsn` with `OUTPUT_SETTINGS`, `NO_TIMEOUTS` and `row_security = off` (a read that
    row-level security would filter fails instead: the stream is never filtered) pinned
    in its libpq `options`.

    They come after any the DSN has: a later `-c` wins, so the DSN's own options (a
    `search_path`, say) are kept and these override what it, the role or the
    database set. Raises `psycopg.ProgrammingError` for a DSN libpq cannot parse.
    """
    return pinned_conninfo(dsn, OUTPUT_SETTINGS + NO_TIMEOUTS + (("row_security", "off"),))


class ValueDecodeError(DecodeError):
    """A column's text is not valid for its type."""

    def __init__(self, type_oid: int, text: str, reason: str) -> None:
        self.type_oid, self.text = type_oid, text
        shown = text if len(text) <= 80 else text[:77] + "..."
        super().__init__(f"cannot decode {shown!r} as type {type_oid}: {reason}")


class OutOfRangeError(ValueDecodeError):
    """A valid Postgres value that Python's types cannot represent."""


class _Invalid(Exception):
    """Raised inside the per-type parsers; `decode_text` turns it into ValueDecodeError."""


class _OutOfRange(_Invalid):
    pass


OID: dict[str, int] = {
    "bool": 16,
    "bytea": 17,
    "char": 18,
    "name": 19,
    "int8": 20,
    "int2": 21,
    "int4": 23,
    "text": 25,
    "oid": 26,
    "json": 114,
    "float4": 700,
    "float8": 701,
    "bpchar": 1042,
    "varchar": 1043,
    "date": 1082,
    "time": 1083,
    "timestamp": 1114,
    "timestamptz": 1184,
    "timetz": 1266,
    "numeric": 1700,
    "uuid": 2950,
    "jsonb": 3802,
}

# Array type OID → element type OID, for the element types above.
ARRAY_ELEMENT: dict[int, int] = {
    1000: OID["bool"],
    1001: OID["bytea"],
    1002: OID["char"],
    1003: OID["name"],
    1016: OID["int8"],
    1005: OID["int2"],
    1007: OID["int4"],
    1009: OID["text"],
    1028: OID["oid"],
    199: OID["json"],
    1021: OID["float4"],
    1022: OID["float8"],
    1014: OID["bpchar"],
    1015: OID["varchar"],
    1182: OID["date"],
    1183: OID["time"],
    1115: OID["timestamp"],
    1185: OID["timestamptz"],
    1270: OID["timetz"],
    1231: OID["numeric"],
    2951: OID["uuid"],
    3807: OID["jsonb"],
}

_INT_RANGES = {
    OID["int2"]: (-(2**15), 2**15 - 1),
    OID["int4"]: (-(2**31), 2**31 - 1),
    OID["int8"]: (-(2**63), 2**63 - 1),
    OID["oid"]: (0, 2**32 - 1),
}

_INT = re.compile(r"[-+]?[0-9]+")
_NUMBER = re.compile(r"[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?")
_DATE = r"(?P<y>[0-9]{4,})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})"
_TIME = r"(?P<h>[0-9]{2}):(?P<mi>[0-9]{2}):(?P<s>[0-9]{2})(?:\.(?P<f>[0-9]{1,6}))?"
_TZ = r"(?P<tz>[-+])(?P<tzh>[0-9]{2})(?::(?P<tzm>[0-9]{2})(?::(?P<tzs>[0-9]{2}))?)?"
_DATE_RE = re.compile(_DATE + r"(?P<bc> BC)?")
_TIME_RE = re.compile(_TIME)
_TIMETZ_RE = re.compile(_TIME + _TZ)
_TIMESTAMP_RE = re.compile(_DATE + " " + _TIME + r"(?P<bc> BC)?")
_TIMESTAMPTZ_RE = re.compile(_DATE + " " + _TIME + _TZ + r"(?P<bc> BC)?")
_UUID = re.compile(r"[0-9a-fA-F]{8}-?(?:[0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
_ESCAPED_BYTE = re.compile(rb"\\(\\|[0-3][0-7]{2})")
_ARRAY_BOUNDS = re.compile(r"(?:\[-?[0-9]+:-?[0-9]+\])+=")
_MAX_ARRAY_DEPTH = 6  # Postgres's MAXDIM
_ARRAY_SPACE = " \t\n\r\v\f"  # what Postgres trims around unquoted elements; not str.strip()'s set


def _match(pattern: re.Pattern[str], text: str) -> re.Match[str]:
    m = pattern.fullmatch(text)
    if m is None:
        raise _Invalid("not in the expected format")
    return m


def _int(text: str, lo: int, hi: int) -> int:
    _match(_INT, text)
    value = int(text)
    if not lo <= value <= hi:
        raise _Invalid(f"out of range [{lo}, {hi}]")
    return value


def _numeric(text: str) -> Decimal:
    if text in ("NaN", "Infinity", "-Infinity"):
        return Decimal(text)
    _match(_NUMBER, text)
    return Decimal(text)


def _float(text: str) -> float:
    if text.lower() in ("nan", "infinity", "-infinity", "inf", "-inf", "+infinity", "+inf"):
        return float(text)
    _match(_NUMBER, text)
    return float(text)


def _bool(text: str) -> bool:
    if text == "t":
        return True
    if text == "f":
        return False
    raise _Invalid("expected 't' or 'f'")


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except RecursionError:
        raise _Invalid("nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int() digit limits
        raise _Invalid(str(exc)) from None


def _date_parts(m: re.Match[str]) -> date:
    if m["bc"]:
        raise _OutOfRange("years BC are out of Python's range")
    if len(m["y"]) > 4:
        raise _OutOfRange("years after 9999 are out of Python's range")
    return date(int(m["y"]), int(m["mo"]), int(m["d"]))


def _time_parts(m: re.Match[str], tz: timezone | None = None) -> time:
    hour = int(m["h"])
    if hour == 24 and m["mi"] == "00" and m["s"] == "00" and not (m["f"] or "").strip("0"):
        raise _OutOfRange("24:00:00 is out of Python's range")
    micros = int((m["f"] or "").ljust(6, "0"))
    return time(hour, int(m["mi"]), int(m["s"]), micros, tzinfo=tz)


def _offset(m: re.Match[str]) -> timezone:
    seconds = int(m["tzh"]) * 3600 + int(m["tzm"] or 0) * 60 + int(m["tzs"] or 0)
    return timezone(timedelta(seconds=-seconds if m["tz"] == "-" else seconds))


def _date(text: str) -> date:
    if text == "infinity":
        return date.max
    if text == "-infinity":
        return date.min
    return _date_parts(_match(_DATE_RE, text))


def _time(text: str) -> time:
    return _time_parts(_match(_TIME_RE, text))


def _timetz(text: str) -> time:
    m = _match(_TIMETZ_RE, text)
    return _time_parts(m, _offset(m))


def _timestamp(text: str) -> datetime:
    if text == "infinity":
        return datetime.max
    if text == "-infinity":
        return datetime.min
    m = _match(_TIMESTAMP_RE, text)
    return datetime.combine(_date_parts(m), _time_parts(m))


def _timestamptz(text: str) -> datetime:
    if text == "infinity":
        return datetime.max.replace(tzinfo=UTC)
    if text == "-infinity":
        return datetime.min.replace(tzinfo=UTC)
    m = _match(_TIMESTAMPTZ_RE, text)
    return datetime.combine(_date_parts(m), _time_parts(m, _offset(m)))


def _uuid(text: str) -> uuid.UUID:
    return uuid.UUID(_match(_UUID, text).group())


def _bytea(text: str) -> bytes:
    if text.startswith("\\x"):
        return bytes.fromhex(_match(_HEX, text[2:]).group())
    # Escape format: printable ASCII as is, '\\' for a backslash, '\ooo' for other bytes.
    raw = text.encode("latin-1")  # UnicodeEncodeError is a ValueError: non-byte characters
    if b"\\" in _ESCAPED_BYTE.sub(b"", raw):
        raise _Invalid("bad escape in bytea escape format")
    return _ESCAPED_BYTE.sub(lambda m: bytes([int(m[1], 8)]) if m[1] != b"\\" else b"\\", raw)


def _str(text: str) -> str:
    return text


_PARSERS: dict[int, Callable[[str], object]] = {
    OID["bool"]: _bool,
    OID["bytea"]: _bytea,
    OID["numeric"]: _numeric,
    OID["float4"]: _float,
    OID["float8"]: _float,
    OID["json"]: _json,
    OID["jsonb"]: _json,
    OID["date"]: _date,
    OID["time"]: _time,
    OID["timetz"]: _timetz,
    OID["timestamp"]: _timestamp,
    OID["timestamptz"]: _timestamptz,
    OID["uuid"]: _uuid,
    **{oid: _str for oid in (OID["text"], OID["varchar"], OID["bpchar"], OID["name"], OID["char"])},
    **{oid: partial(_int, lo=lo, hi=hi) for oid, (lo, hi) in _INT_RANGES.items()},
}


def _split_array(text: str) -> list[object]:
    """Parse array text ('{1,NULL,"a b"}', nested braces) into nested lists of str | None."""
    m = _ARRAY_BOUNDS.match(text)
    pos = m.end() if m else 0
    if not text.startswith("{", pos):
        raise _Invalid("array text must start with '{'")
    stack: list[list[object]] = []
    result: list[object] = []
    n = len(text)
    expect_item = True  # after '{' or ',' an element (or, right after '{', a '}') comes next
    while pos < n:
        ch = text[pos]
        if ch == "{":
            if not expect_item:
                raise _Invalid(f"unexpected '{{' at {pos}")
            if len(stack) >= _MAX_ARRAY_DEPTH:
                raise _Invalid(f"more than {_MAX_ARRAY_DEPTH} dimensions")
            inner: list[object] = []
            if stack:
                stack[-1].append(inner)
            else:
                result = inner
            stack.append(inner)
            pos += 1
            continue
        if not stack:
            raise _Invalid(f"text after the closing '}}' at {pos}")
        if ch == "}":
            if expect_item and text[pos - 1] == ",":
                raise _Invalid(f"missing element before '}}' at {pos}")
            stack.pop()
            expect_item = False
            pos += 1
            continue
        if ch == ",":
            if expect_item:
                raise _Invalid(f"missing element before ',' at {pos}")
            expect_item = True
            pos += 1
            continue
        if not expect_item:
            raise _Invalid(f"expected ',' or '}}' at {pos}")
        item, pos = _array_item(text, pos)
        stack[-1].append(item)
        expect_item = False
    if stack:
        raise _Invalid("unterminated array")
    return result


def _array_item(text: str, pos: int) -> tuple[str | None, int]:
    """One element starting at `pos`: a quoted string, or bare text where NULL means None."""
    out: list[str] = []
    quoted = text[pos] == '"'
    escaped = False
    if quoted:
        pos += 1
    n = len(text)
    while True:
        if pos >= n:
            raise _Invalid("unterminated array element")
        ch = text[pos]
        if ch == "\\":
            if pos + 1 >= n:
                raise _Invalid("backslash at end of array text")
            out.append(text[pos + 1])
            escaped = True
            pos += 2
        elif quoted and ch == '"':
            return "".join(out), pos + 1
        elif not quoted and ch in ",}":
            break
        elif not quoted and ch in '{"':
            raise _Invalid(f"unexpected {ch!r} in unquoted array element at {pos}")
        else:
            out.append(ch)
            pos += 1
    bare = "".join(out).strip(_ARRAY_SPACE)
    if not bare:
        raise _Invalid(f"empty unquoted array element at {pos}")
    return (None if not escaped and bare.upper() == "NULL" else bare), pos


def _map_array(items: list[object], parse: Callable[[str], object]) -> list[object]:
    return [
        _map_array(x, parse) if isinstance(x, list) else (None if x is None else parse(str(x)))
        for x in items
    ]


def decodes(type_oid: int) -> bool:
    """Whether `decode_text` parses values of `type_oid` (else it returns their text)."""
    return ARRAY_ELEMENT.get(type_oid, type_oid) in _PARSERS


def decode_text(type_oid: int, text: str) -> object:
    """Decode one text-format value of type `type_oid`; unknown OIDs return `text` as is."""
    if text.__class__ is NotUtf8:
        raise ValueDecodeError(type_oid, text, "its bytes are not UTF-8 (a SQL_ASCII database "
                               "stores any bytes); store it as UTF-8 at the source")
    element = ARRAY_ELEMENT.get(type_oid)
    parse = _PARSERS.get(type_oid if element is None else element)
    if parse is None:
        return text
    try:
        if element is None:
            return parse(text)
        return _map_array(_split_array(text), parse)
    except _OutOfRange as exc:
        raise OutOfRangeError(type_oid, text, str(exc)) from None
    except (_Invalid, ValueError, OverflowError) as exc:
        raise ValueDecodeError(type_oid, text, str(exc) or type(exc).__name__) from None
