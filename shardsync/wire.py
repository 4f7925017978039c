"""The sync protocol's page encoding: `Page` <-> JSON, and gzip on the wire.

A page travels as one JSON object (UTF-8), gzip-compressed when the client accepts it:

    {"since": 41, "next_cursor": 57, "has_more": false, "entries": [
      {"op": "u", "key": ["note", "7", "leaf"], "partition": "user-1",
       "title": "…", "body": "…", "keywords": ["…"], "payload": {…}, "attrs": {…},
       "source_updated_at": "2026-01-02T03:04:05+00:00" | null,
       "tf": {"term": [title_tf, body_tf], …}, "len_title": 3, "len_body": 12,
       "vectors": {"local": "<base64 of dim little-endian float32>"}, "pending": []},
      {"op": "d", "key": ["note", "8", "leaf"], "partition": "user-1"}]}

Vectors are the exact float32 bytes the server stores, base64-encoded, so a device
holds them bit for bit. `decode_page` checks every field's type and raises
`WireFormatError` on anything else; it never returns a half-read page.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from slipstream.index.errors import SlipstreamError

from .entries import Entry, Page, ShardRow, Tombstone

MEDIA_TYPE = "application/json"
GZIP_MIN_BYTES = 1024
GZIP_LEVEL = 6


class WireFormatError(SlipstreamError):
    """A page from the sync server did not have the documented layout; nothing was applied."""


def encode_entry(entry: Entry) -> dict[str, Any]:
    if isinstance(entry, Tombstone):
        return {"op": "d", "key": list(entry.key), "partition": entry.partition}
    ts = entry.source_updated_at
    return {
        "op": "u", "key": list(entry.key), "partition": entry.partition,
        "title": entry.title, "body": entry.body, "keywords": list(entry.keywords),
        "payload": entry.payload, "attrs": entry.attrs,
        "source_updated_at": None if ts is None else ts.isoformat(),
        "tf": {t: [c[0], c[1]] for t, c in entry.tf.items()},
        "len_title": entry.len_title, "len_body": entry.len_body,
        "vectors": {s: base64.b64encode(v).decode("ascii") for s, v in entry.vectors.items()},
        "pending": list(entry.pending),
    }


def encode_page(page: Page) -> bytes:
    """The page as compact JSON bytes."""
    body = {"since": page.since, "next_cursor": page.next_cursor, "has_more": page.has_more,
            "entries": [encode_entry(e) for e in page.entries]}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def accepts_gzip(accept_encoding: str | None) -> bool:
    return "gzip" in {p.split(";")[0].strip().lower() for p in (accept_encoding or "").split(",")}


def gzip_body(body: bytes) -> bytes | None:
    """`body` gzip-compressed, or None when it is too small to be worth it."""
    return gzip.compress(body, GZIP_LEVEL, mtime=0) if len(body) >= GZIP_MIN_BYTES else None


def maybe_gzip(body: bytes, accept_encoding: str | None) -> tuple[bytes, dict[str, str]]:
    """`body`, gzip-compressed when the client accepts it and it is worth it, with headers."""
    packed = gzip_body(body) if accepts_gzip(accept_encoding) else None
    if packed is not None:
        return packed, {"content-encoding": "gzip", "vary": "accept-encoding"}
    return body, {"vary": "accept-encoding"}


# -- decoding ------------------------------------------------------------------------------

def _fail(what: str) -> WireFormatError:
    return WireFormatError(f"malformed page from the sync server: {what}; the server and this "
                           "client may speak different protocol versions (upgrade both)")


def _get(obj: Mapping[str, Any], name: str, types: type | tuple[type, ...], where: str) -> Any:
    if name not in obj:
        raise _fail(f"{where} has no {name!r}")
    value = obj[name]
    if not isinstance(value, types) or isinstance(value, bool) and bool not in (
            types if isinstance(types, tuple) else (types,)):
        raise _fail(f"{where}.{name} has the wrong type ({type(value).__name__})")
    return value


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(f"{where} is not a list of strings")
    return tuple(value)


def _key(value: Any, where: str) -> tuple[str, str, str]:
    key = _str_list(value, f"{where}.key")
    if len(key) != 3:
        raise _fail(f"{where}.key does not have 3 parts")
    return key  # type: ignore[return-value]


def decode_entry(obj: Any, where: str = "entry") -> Entry:
    if not isinstance(obj, dict):
        raise _fail(f"{where} is not an object")
    op = _get(obj, "op", str, where)
    key = _key(obj.get("key"), where)
    partition = _get(obj, "partition", str, where)
    if op == "d":
        return Tombstone(key, partition)
    if op != "u":
        raise _fail(f"{where}.op is {op!r}, not 'u' or 'd'")
    ts = obj.get("source_updated_at")
    if ts is not None:
        try:
            ts = datetime.fromisoformat(ts)
        except (TypeError, ValueError):
            raise _fail(f"{where}.source_updated_at is not an ISO timestamp") from None
    tf_raw = _get(obj, "tf", dict, where)
    tf: dict[str, tuple[int, int]] = {}
    for term, counts in tf_raw.items():  # json.loads gives exact types: bool is not int here
        if type(counts) is not list or len(counts) != 2 or type(counts[0]) is not int \
                or type(counts[1]) is not int:
            raise _fail(f"{where}.tf[{term!r}] is not [title_tf, body_tf]")
        tf[term] = (counts[0], counts[1])
    vectors: dict[str, bytes] = {}
    for space, text in _get(obj, "vectors", dict, where).items():
        try:
            vectors[space] = base64.b64decode(text, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise _fail(f"{where}.vectors[{space!r}] is not base64") from None
        if len(vectors[space]) % 4:
            raise _fail(f"{where}.vectors[{space!r}] is not a whole number of float32s")
    return ShardRow(
        key=key, partition=partition, title=_get(obj, "title", str, where),
        body=_get(obj, "body", str, where),
        keywords=_str_list(obj.get("keywords"), f"{where}.keywords"),
        payload=_get(obj, "payload", dict, where), attrs=_get(obj, "attrs", dict, where),
        source_updated_at=ts, tf=tf, len_title=_get(obj, "len_title", int, where),
        len_body=_get(obj, "len_body", int, where), vectors=vectors,
        pending=_str_list(obj.get("pending", []), f"{where}.pending"))


def decode_page(data: bytes | str) -> Page:
    """A `Page` from the JSON the server sent (already un-gzipped), or `WireFormatError`."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _fail("the page is not an object")
    entries = _get(obj, "entries", list, "page")
    since = obj.get("since")
    if since is not None and (not isinstance(since, int) or isinstance(since, bool)):
        raise _fail("page.since is not an integer")
    return Page(tuple(decode_entry(e, f"entries[{i}]") for i, e in enumerate(entries)),
                _get(obj, "next_cursor", int, "page"), _get(obj, "has_more", bool, "page"),
                since)
