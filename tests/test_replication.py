"""The replication client: codecs from bytes, generators from a fake libpq, and a real walsender.

Pure tests pin the wire layouts byte for byte. The rest run against the session's
Postgres (a fresh database per test) and cover the things that go wrong in production:
a slot held by someone else, a role without REPLICATION, wal_level too low, the
walsender killed, the network cut or silent, and wal_sender_timeout while idle.
"""

from __future__ import annotations

import random
import struct

import pytest
from slipstream.index.errors import ConfigurationError, SlipstreamError, ValidationError
from slipstream.worker.errors import (
    ReplicationConnectionError,
    ReplicationPermissionError,
    ReplicationProtocolError,
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
from slipstream.worker.replication_proto import (
    Keepalive,
    Wait,
    XLogData,
    encode_status_update,
    parse_copy_data,
    pg_now_us,
    read_copy_data_gen,
)

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


def test_parse_xlogdata_from_bytes() -> None:
    raw = b"w" + struct.pack(">QQq", 0x1_00000010, 0x1_00000020, 123_456) + b"B\x00payload"
    assert parse_copy_data(raw) == XLogData(0x1_00000010, 0x1_00000020, 123_456, b"B\x00payload")
    empty = parse_copy_data(memoryview(b"w" + bytes(24)))
    assert empty == XLogData(0, 0, 0, b"")
    assert empty.sent_at.isoformat() == "2000-01-01T00:00:00+00:00"


def test_parse_keepalive_from_bytes() -> None:
    raw = b"k" + (0x2A).to_bytes(8, "big") + (1_000_000).to_bytes(8, "big") + b"\x01"
    assert parse_copy_data(raw) == Keepalive(wal_end=42, send_time=1_000_000, reply_requested=True)
    assert parse_copy_data(raw[:-1] + b"\x00").reply_requested is False  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "raw",
    [b"", b"w", b"w" + bytes(23), b"k" + bytes(16), b"k" + bytes(18), b"x" + bytes(30)],
    ids=["empty", "w-no-header", "w-short", "k-short", "k-long", "unknown-type"],
)
def test_malformed_copy_data_raises_protocol_error(raw: bytes) -> None:
    with pytest.raises(ReplicationProtocolError) as info:
        parse_copy_data(raw)
    assert isinstance(info.value, SlipstreamError)


def test_status_update_exact_bytes() -> None:
    encoded = encode_status_update(
        0x1_00000003, 0x1_00000002, 0x1_00000001, 0x0102030405060708, True
    )
    assert encoded == (
        b"r"
        + b"\x00\x00\x00\x01\x00\x00\x00\x03"
        + b"\x00\x00\x00\x01\x00\x00\x00\x02"
        + b"\x00\x00\x00\x01\x00\x00\x00\x01"
        + b"\x01\x02\x03\x04\x05\x06\x07\x08"
        + b"\x01"
    )
    assert (
        encode_status_update(0, 0, 0, 0)[-1:] == b"\x00"
        and len(encode_status_update(0, 0, 0, 0)) == 34
    )
    with pytest.raises(ValidationError):
        encode_status_update(-1, 0, 0, 0)


def test_pg_clock_counts_from_2000() -> None:
    assert pg_now_us(lambda: 946_684_800 * 10**9) == 0
    assert pg_now_us(lambda: 946_684_801 * 10**9 + 5_000) == 1_000_005


class _FakePGconn:
    """Just enough libpq for read_copy_data_gen: rows arrive only after consume_input()."""

    def __init__(self, rows: list[bytes]) -> None:
        self.incoming, self.buffered, self.consumed = list(rows), list[bytes](), 0

    def get_copy_data(self, async_: int) -> tuple[int, memoryview]:
        if self.buffered:
            row = self.buffered.pop(0)
            return len(row), memoryview(row)
        return 0, memoryview(b"")

    def consume_input(self) -> None:
        self.consumed += 1
        self.buffered += self.incoming[:1]
        del self.incoming[:1]


def test_read_copy_data_gen_yields_read_until_a_row_is_buffered() -> None:
    pgconn = _FakePGconn([b"k" + bytes(17)])
    gen = read_copy_data_gen(pgconn)  # type: ignore[arg-type]
    assert next(gen) is Wait.R  # nothing buffered: it asks to wait for the socket
    with pytest.raises(StopIteration) as done:
        gen.send(Wait.R)
    assert done.value.value == b"k" + bytes(17) and pgconn.consumed == 1


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
