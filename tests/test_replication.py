"""The replication client: codecs from bytes, generators from a fake libpq, and a real walsender.

Pure tests pin the wire layouts byte for byte. The rest run against the session's
Postgres (a fresh database per test) and cover the things that go wrong in production:
a slot held by someone else, a role without REPLICATION, wal_level too low, the
walsender killed, the network cut or silent, and wal_sender_timeout while idle.
"""

from __future__ import annotations

import random

import pytest
from slipstream.index.errors import ConfigurationError, SlipstreamError, ValidationError
from slipstream.worker.errors import (
    ReplicationConnectionError,
    ReplicationPermissionError,
    ReplicationServerError,
    RetryPolicy,
    SlotAlreadyExistsError,
    SlotInUseError,
    SlotNotFoundError,
    WalLevelError,
    classify,
    error_from_server,
)
from slipstream.worker.lsn import format_lsn, parse_lsn

# --- pure: LSNs, codecs, generators, error policy ---------------------------------


def test_lsn_round_trip() -> None:
    assert parse_lsn("16/B374D848") == 0x16_B374D848
    assert format_lsn(0x16_B374D848) == "16/B374D848"
    assert parse_lsn("0/0") == 0 and format_lsn(0) == "0/0"
    assert parse_lsn("ffffffff/ffffffff") == 2**64 - 1
    for bad in ["", "16", "16/", "/1", "g/1", "1/2/3", "123456789/0"]:
        with pytest.raises(ValidationError):
            parse_lsn(bad)
    for bad_int in [-1, 2**64, True]:
        with pytest.raises(ValidationError):
            format_lsn(bad_int)


def test_error_policy_maps_server_errors_to_typed_errors() -> None:
    def make(msg: str, state: str | None, lost: bool = False) -> Exception:
        return error_from_server(
            msg, sqlstate=state, connection_lost=lost, user="app", dbname="db", slot="s"
        )

    cases: list[tuple[Exception, type, str]] = [
        (
            make('ERROR:  replication slot "s" is active for PID 7\n', "55006"),
            SlotInUseError,
            "retry",
        ),
        (make('ERROR:  replication slot "s" does not exist', "42704"), SlotNotFoundError, "stop"),
        (
            make('ERROR:  replication slot "s" already exists', "42710"),
            SlotAlreadyExistsError,
            "stop",
        ),
        (
            make("FATAL:  permission denied to start WAL sender", None, True),
            ReplicationPermissionError,
            "stop",
        ),
        (
            make("ERROR:  must be superuser or replication role to use replication slots", "42501"),
            ReplicationPermissionError,
            "stop",
        ),
        (
            make('ERROR:  logical decoding requires "wal_level" >= "logical"', "55000"),
            WalLevelError,
            "stop",
        ),
        (
            make("server closed the connection unexpectedly", None, True),
            ReplicationConnectionError,
            "retry",
        ),
        (
            make("FATAL:  terminating connection due to administrator command", "57P01"),
            ReplicationConnectionError,
            "retry",
        ),
        (make("FATAL:  sorry, too many clients already", "53300"), ReplicationServerError, "retry"),
        (make("ERROR:  syntax error", "42601"), ReplicationServerError, "stop"),
    ]
    for error, cls, decision in cases:
        assert type(error) is cls, error
        assert classify(error) == decision, error
        assert isinstance(error, SlipstreamError)
    permission = cases[3][0]
    assert isinstance(permission, ConfigurationError)
    assert "ALTER ROLE app WITH REPLICATION;" in str(permission)
    assert "GRANT SELECT" in str(permission) and "GRANT CREATE ON DATABASE db" in str(permission)
    assert "wal_level = logical" in str(cases[5][0]) and "restart" in str(cases[5][0])
    assert classify(ValueError("a bug")) == "stop" and classify(ConnectionResetError()) == "retry"


def test_retry_policy_backs_off_exponentially_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(initial_delay=1.0, max_delay=8.0, multiplier=2.0, max_attempts=20)
    rng = random.Random(7)
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (10, 8.0), (10_000, 8.0)]:
        delays = [policy.backoff(attempt, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered
    in_use = SlotInUseError("busy", sqlstate="55006")
    assert policy.decide(in_use, 0, rng).action == "retry"
    assert policy.decide(in_use, 20, rng).action == "stop"  # gave up
    stop = policy.decide(SlotNotFoundError("gone"), 0, rng)
    assert (stop.action, stop.delay, stop.reason) == ("stop", 0.0, "gone")
