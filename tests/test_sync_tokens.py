"""Device tokens and the page codec, without a server: what is accepted, what is refused."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime

import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from slipstream.index.errors import ConfigurationError, ValidationError
from slipstream.shardsync.reader import Page, ShardRow, Tombstone
from slipstream.shardsync.tokens import TokenError, TokenVerifier, issue_token, parse_ttl
from slipstream.shardsync.wire import WireFormatError, decode_page, encode_page, maybe_gzip

SECRET = "s" * 40


def ed25519_pair() -> tuple[bytes, bytes]:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def test_hs256_token_round_trip_lists_its_partitions():
    token = issue_token(SECRET, ["user-1", "org {7}/x"], ttl="1h", subject="device-9")
    grant = TokenVerifier(SECRET).verify(token)
    assert grant.partitions == {"user-1", "org {7}/x"}
    assert grant.subject == "device-9"
    assert time.time() + 3500 < grant.expires_at <= time.time() + 3601
    assert grant.allows(["user-1"]) and not grant.allows(["user-1", "user-2"])


def test_a_minters_clock_a_little_ahead_or_behind_is_forgiven():
    """Regression: with no leeway, a token minted by an app server whose clock ran a few
    seconds ahead was refused as not yet valid (`iat` in the future) until this clock
    caught up. The default forgives 60 s, on `iat`, `nbf` and `exp` alike."""
    now = time.time()
    verifier = TokenVerifier(SECRET)
    ahead = issue_token(SECRET, ["a"], ttl=600, now=now + 30)
    assert verifier.verify(ahead).partitions == {"a"}
    assert verifier.verify(jwt.encode({"partitions": ["a"], "exp": int(now) + 600, "nbf": int(now) + 30},
                                      SECRET, "HS256")).partitions == {"a"}
    assert verifier.verify(issue_token(SECRET, ["a"], ttl=10, now=now - 40)).partitions == {"a"}
    for token in (issue_token(SECRET, ["a"], ttl=600, now=now + 90),  # too far ahead
                  issue_token(SECRET, ["a"], ttl=10, now=now - 90)):  # expired 80 s ago
        with pytest.raises(TokenError):
            verifier.verify(token)
    with pytest.raises(TokenError, match="ImmatureSignatureError"):
        TokenVerifier(SECRET, leeway=0).verify(ahead)


def test_eddsa_tokens_verify_with_the_public_key_only():
    private, public = ed25519_pair()
    token = issue_token(private, ["a"], algorithm="EdDSA", audience="app")
    assert TokenVerifier(public, algorithm="EdDSA", audience="app").verify(token).partitions == {"a"}
    _, other_public = ed25519_pair()
    with pytest.raises(TokenError):
        TokenVerifier(other_public, algorithm="EdDSA", audience="app").verify(token)


@pytest.mark.parametrize("case", ["missing", "garbage", "expired", "tampered", "none", "wrong_key",
                                  "wrong_audience", "unexpected_audience", "no_partitions",
                                  "partitions_not_list", "no_exp", "hs256_on_eddsa_server"])
def test_bad_tokens_are_refused(case):
    verifier = TokenVerifier(SECRET, audience="app") if "audience" in case and case != \
        "unexpected_audience" else TokenVerifier(SECRET)
    now = int(time.time())
    good = {"partitions": ["a"], "exp": now + 60}
    token = {
        "missing": None,
        "garbage": "not.a.jwt",
        "expired": jwt.encode({"partitions": ["a"], "exp": now - 61}, SECRET, "HS256"),
        "tampered": None,
        "none": jwt.encode(good, None, algorithm="none"),
        "wrong_key": jwt.encode(good, "k" * 40, "HS256"),
        "wrong_audience": jwt.encode({**good, "aud": "other"}, SECRET, "HS256"),
        "unexpected_audience": jwt.encode({**good, "aud": "app"}, SECRET, "HS256"),
        "no_partitions": jwt.encode({"exp": now + 60}, SECRET, "HS256"),
        "partitions_not_list": jwt.encode({"partitions": "a", "exp": now + 60}, SECRET, "HS256"),
        "no_exp": jwt.encode({"partitions": ["a"]}, SECRET, "HS256"),
        "hs256_on_eddsa_server": jwt.encode(good, SECRET, "HS256"),
    }[case]
    if case == "tampered":
        head, payload, sig = jwt.encode(good, SECRET, "HS256").split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        claims["partitions"] = ["b"]
        forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        token = f"{head}.{forged}.{sig}"
    if case == "hs256_on_eddsa_server":
        verifier = TokenVerifier(ed25519_pair()[1], algorithm="EdDSA")
    with pytest.raises(TokenError) as info:
        verifier.verify(token)
    assert info.value.reason


def test_token_configuration_errors_name_the_fix():
    with pytest.raises(ConfigurationError, match="at least 32"):
        TokenVerifier("short")
    with pytest.raises(ConfigurationError, match="not supported"):
        TokenVerifier(SECRET, algorithm="none")
    with pytest.raises(ValidationError, match="empty"):
        issue_token(SECRET, [])
    with pytest.raises(ValidationError, match="duration"):
        parse_ttl("soon")
    assert parse_ttl("15m") == 900 and parse_ttl("2d") == 172800 and parse_ttl(30) == 30


def _row(i: int) -> ShardRow:
    vec = np.random.default_rng(i).standard_normal(8).astype("<f4")
    return ShardRow(key=("note", str(i), "leaf"), partition="p", title=f"t{i} é", body="b",
                    keywords=("k",), payload={"n": i, "s": "x"}, attrs={"a": [1, None]},
                    source_updated_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
                    tf={"t": (1, 0), "b": (0, 2)}, len_title=1, len_body=2,
                    vectors={"local": vec.tobytes()}, pending=("server",))


def test_pages_round_trip_exactly_vectors_bit_for_bit():
    page = Page((_row(1), Tombstone(("note", "2", "leaf"), "p"), _row(3)), 42, True, 17)
    assert decode_page(encode_page(page)) == page
    _, headers = maybe_gzip(encode_page(page), "br, gzip;q=0.9")
    assert headers.get("content-encoding") == "gzip" or len(encode_page(page)) < 1024
    assert maybe_gzip(b"x" * 2000, "identity")[1].get("content-encoding") is None


@pytest.mark.parametrize("bad", [
    b"not json", b"[]", b'{"entries": [], "has_more": false}',
    b'{"entries": [{"op": "x", "key": ["a","b","c"], "partition": "p"}], "next_cursor": 1, "has_more": false}',
    b'{"entries": [{"op": "d", "key": ["a","b"], "partition": "p"}], "next_cursor": 1, "has_more": false}',
    b'{"entries": [], "next_cursor": true, "has_more": false}',
    *(b'{"entries": [{"op": "u", "key": ["a","b","c"], "partition": "p", "title": "", "body": "", '
      b'"keywords": [], "payload": {}, "attrs": {}, "tf": {"t": ' + counts + b'}, "len_title": 1, '
      b'"len_body": 0, "vectors": {}}], "next_cursor": 1, "has_more": false}'
      for counts in (b"[true, 0]", b"[1, 0.5]", b"[1]", b"[1, 0, 2]", b'"1,0"', b"[1, null]")),
])
def test_malformed_pages_raise_a_typed_error(bad):
    with pytest.raises(WireFormatError, match="malformed page"):
        decode_page(bad)


def test_a_vector_that_is_not_base64_float32_is_refused():
    entry = json.loads(encode_page(Page((_row(1),), 1, False, 0)))
    entry["entries"][0]["vectors"]["local"] = base64.b64encode(b"abc").decode()
    with pytest.raises(WireFormatError, match="float32"):
        decode_page(json.dumps(entry))


def test_the_device_side_needs_no_postgres_driver():
    import subprocess
    import sys

    code = ("import sys; sys.modules['psycopg'] = None; sys.modules['psycopg_pool'] = None\n"
            "import slipstream.shardsync.client, slipstream.shardsync.wire\n"
            "import slipstream.shardsync.tokens")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
