"""Device tokens: bearer JWTs (PyJWT) that say which partitions a device may read.

A token's claims are `partitions` (a non-empty list of partition names, free text),
`exp` (required), `iat`, and `aud` when the server is configured with an audience.
It is signed with HS256 from a shared secret, or with an asymmetric key (EdDSA or
RS256): then the server holds only the public key and an application's existing
auth service mints tokens with the private one.

`TokenVerifier.verify()` is the only place a token is accepted. It refuses, with a
`TokenError` (whose `reason` is for the server's log, never for the response body):
a missing or malformed token, a bad signature, a wrong key, an algorithm other than
the configured one (`none` included), an expired token, a wrong or missing audience,
and claims without a usable partition list. `issue_token()` mints tokens for the CLI
and for tests; `parse_ttl("1h")` reads the CLI's durations.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jwt
from slipstream.index.errors import ConfigurationError, SlipstreamError, ValidationError

PARTITIONS_CLAIM = "partitions"
SYMMETRIC = ("HS256",)
ASYMMETRIC = ("EdDSA", "RS256")
ALGORITHMS = SYMMETRIC + ASYMMETRIC
MIN_SECRET_BYTES = 32
MAX_PARTITIONS = 1000
_TTL = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class TokenError(SlipstreamError):
    """A bearer token was refused. `reason` says why, for the server's log only."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"device token refused: {reason}")


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows: read these partitions until `expires_at` (epoch s)."""

    partitions: frozenset[str]
    expires_at: float
    subject: str | None = None

    def allows(self, partitions: Iterable[str]) -> bool:
        return all(p in self.partitions for p in partitions)


def check_partitions(partitions: Iterable[object], what: str = "partitions") -> tuple[str, ...]:
    """The partition names as a tuple of distinct non-empty strings, or ValidationError."""
    if isinstance(partitions, (str, bytes)):
        raise ValidationError(f"{what} must be a list of partition names, not one string")
    out: list[str] = []
    for p in partitions:
        if not isinstance(p, str) or not p or len(p) > 1024 or "\x00" in p:
            raise ValidationError(f"{what}: {p!r} is not a partition name (a non-empty string "
                                  "of at most 1024 characters, no NUL)")
        if p not in out:
            out.append(p)
    if not out:
        raise ValidationError(f"{what} is empty; name at least one partition")
    if len(out) > MAX_PARTITIONS:
        raise ValidationError(f"{what} lists {len(out)} partitions; at most {MAX_PARTITIONS}")
    return tuple(out)


def parse_ttl(text: str | float, *, allow_zero: bool = False) -> float:
    """Seconds from "90", "90s", "15m", "1h", "7d" (or a number); ValidationError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = _TTL.fullmatch(str(text))
        if not m:
            raise ValidationError(f"ttl {text!r} is not a duration; write e.g. 900, 15m, 1h or 7d")
        seconds = float(m[1]) * _UNITS[m[2]]
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValidationError(f"duration must be {'non-negative' if allow_zero else 'positive'}, "
                              f"got {text!r}")
    return seconds


def _check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ConfigurationError(f"token algorithm {algorithm!r} is not supported; use one of "
                                 f"{', '.join(ALGORITHMS)}")
    return algorithm


def _check_secret(secret: str | bytes) -> bytes:
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"the HS256 token secret is {len(raw)} bytes; use at least {MIN_SECRET_BYTES} random "
            "bytes (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)")
    return raw


def read_key(path: str | Path) -> bytes:
    """A PEM key file's bytes, or ConfigurationError naming the file."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the token key file {str(path)!r}: {exc}") from exc


DEFAULT_LEEWAY = 60.0  # seconds of clock difference forgiven on exp, iat and nbf


class TokenVerifier:
    """Verifies device tokens with one key and one algorithm.

    `key` is the HS256 secret, or the PEM public key for EdDSA/RS256. `audience`, when
    set, must appear in the token's `aud`; when None, a token carrying `aud` is refused
    too (a token minted for another service is not ours). `leeway` (seconds) forgives
    the clock difference between the minter and this server: a token whose `iat` is a
    few seconds ahead of this clock is not refused as not yet valid.
    """

    def __init__(self, key: str | bytes, *, algorithm: str = "HS256", audience: str | None = None,
                 leeway: float = DEFAULT_LEEWAY) -> None:
        self.algorithm = _check_algorithm(algorithm)
        if algorithm in SYMMETRIC:
            self._key: object = _check_secret(key)
        else:
            try:
                self._key = jwt.get_algorithm_by_name(algorithm).prepare_key(key)
            except Exception as exc:
                raise ConfigurationError(f"the {algorithm} verification key is not a usable "
                                         f"public key (PEM): {exc}") from exc
        self.audience = audience
        self.leeway = leeway

    def verify(self, token: str | None) -> Grant:
        if not token:
            raise TokenError("no bearer token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError(f"malformed token: {exc}") from None
        if header.get("alg") != self.algorithm:
            raise TokenError(f"algorithm {header.get('alg')!r} is not the configured "
                             f"{self.algorithm!r}")
        options = {"require": ["exp", PARTITIONS_CLAIM], "verify_aud": self.audience is not None}
        try:
            claims = jwt.decode(token, self._key, algorithms=[self.algorithm],
                                audience=self.audience, options=options, leeway=self.leeway)
        except jwt.PyJWTError as exc:
            raise TokenError(f"{type(exc).__name__}: {exc}") from None
        if self.audience is None and "aud" in claims:
            raise TokenError("token names an audience but this server expects none")
        try:
            partitions = check_partitions(claims[PARTITIONS_CLAIM], f"claim {PARTITIONS_CLAIM!r}")
        except ValidationError as exc:
            raise TokenError(str(exc)) from None
        sub = claims.get("sub")
        return Grant(frozenset(partitions), float(claims["exp"]),
                     sub if isinstance(sub, str) else None)


def issue_token(key: str | bytes, partitions: Iterable[str], *, ttl: str | float = 3600,
                algorithm: str = "HS256", audience: str | None = None,
                subject: str | None = None, now: float | None = None) -> str:
    """A signed token for `partitions`, valid for `ttl` (seconds or "1h").

    `key` is the HS256 secret or the PEM private key for EdDSA/RS256.
    """
    _check_algorithm(algorithm)
    names = check_partitions(partitions)
    issued = int(time.time() if now is None else now)
    claims: dict[str, object] = {PARTITIONS_CLAIM: list(names), "iat": issued,
                                 "exp": issued + max(1, round(parse_ttl(ttl)))}
    if audience:
        claims["aud"] = audience
    if subject:
        claims["sub"] = subject
    signing_key: object = _check_secret(key) if algorithm in SYMMETRIC else key
    try:
        return jwt.encode(claims, signing_key, algorithm=algorithm)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"cannot sign a {algorithm} token with this key: {exc}") from exc
