"""The replication client: codecs from bytes, generators from a fake libpq, and a real walsender.

Pure tests pin the wire layouts byte for byte. The rest run against the session's
Postgres (a fresh database per test) and cover the things that go wrong in production:
a slot held by someone else, a role without REPLICATION, wal_level too low, the
walsender killed, the network cut or silent, and wal_sender_timeout while idle.
"""

from __future__ import annotations

import random
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psycopg
import pytest
from psycopg import sql
from slipstream.index.errors import (
    ConfigurationError,
    InvalidIdentifierError,
    SlipstreamError,
    ValidationError,
)
from slipstream.worker.errors import (
    ReplicationConnectionError,
    ReplicationPermissionError,
    ReplicationProtocolError,
    ReplicationServerError,
    ReplicationStateError,
    RetryPolicy,
    SlotAlreadyExistsError,
    SlotInUseError,
    SlotNotFoundError,
    WalLevelError,
    classify,
    error_from_server,
)
from slipstream.worker.lsn import format_lsn, parse_lsn
from slipstream.worker.replication import ReplicationConnection
from slipstream.worker.replication_proto import (
    Keepalive,
    Wait,
    XLogData,
    encode_status_update,
    parse_copy_data,
    pg_now_us,
    read_copy_data_gen,
)

from .proxy import Proxy

PUB = "slip_pub"
SLOT = "slip_slot"

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


# --- helpers for the real-server tests --------------------------------------------


@dataclass
class Txn:
    """One decoded transaction, from just enough pgoutput (v1) parsing for these tests."""

    kinds: list[bytes] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    end_lsn: int = 0


def _insert_id(payload: bytes) -> int:
    # 'I', relid Int32, 'N', ncols Int16, then per column: 't' Int32 len, bytes
    assert payload[5:6] == b"N"
    (length,) = struct.unpack_from(">i", payload, 9)
    assert payload[8:9] == b"t"
    return int(payload[13 : 13 + length])


def read_txns(
    conn: ReplicationConnection,
    count: int,
    *,
    timeout: float = 10.0,
    on_commit: Callable[[Txn], None] | None = None,
    read_timeout: float = 0.2,
) -> list[Txn]:
    """Read until `count` transactions have committed; fail the test after `timeout`.
    With `read_timeout=0`, read what is ready and sleep briefly when nothing is."""
    txns: list[Txn] = []
    current: Txn | None = None
    deadline = time.monotonic() + timeout
    while len(txns) < count:
        assert time.monotonic() < deadline, f"only {len(txns)} of {count} transactions arrived"
        msg = conn.read_message(timeout=read_timeout)
        if msg is None and read_timeout == 0:
            time.sleep(0.01)
        if not isinstance(msg, XLogData):
            continue
        kind = msg.payload[:1]
        if kind == b"B":
            current = Txn()
        assert current is not None, f"{kind!r} outside a transaction"
        current.kinds.append(kind)
        if kind == b"I":
            current.ids.append(_insert_id(msg.payload))
        if kind == b"C":
            current.end_lsn = struct.unpack_from(">Q", msg.payload, 10)[0]
            txns.append(current)
            if on_commit:
                on_commit(current)
            current = None
    return txns


def _setup(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
        conn.execute(f"CREATE PUBLICATION {PUB} FOR TABLE items")


def _insert(dsn: str, *ids: int) -> None:
    """Each id in its own transaction."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in ids:
            conn.execute("INSERT INTO items VALUES (%s, %s)", (i, f"row {i}"))


def _slot_row(dsn: str, slot: str = SLOT) -> tuple[int, int | None]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    assert row is not None
    return parse_lsn(row[0]), row[1]


def _until(
    check: Callable[[], bool], timeout: float, step: Callable[[], object] = lambda: time.sleep(0.05)
) -> bool:
    """Poll `check` (running `step` between polls) until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        step()
    return check()


def _read_for(conn: ReplicationConnection, seconds: float) -> list[object]:
    """Keep reading (so timers run) for `seconds`; return what arrived."""
    got: list[object] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if (msg := conn.read_message(timeout=min(left, 0.1))) is not None:
            got.append(msg)
    return got


@pytest.fixture
def repl(pg_dsn: str) -> Iterator[ReplicationConnection]:
    _setup(pg_dsn)
    conn = ReplicationConnection.connect(pg_dsn)
    try:
        yield conn
    finally:
        conn.close()


# --- real server ------------------------------------------------------------------


def test_identify_system_names_the_database(pg_dsn: str, repl: ReplicationConnection) -> None:
    ident = repl.identify_system()
    assert ident.dbname == psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"]
    assert ident.timeline >= 1 and ident.xlogpos > 0 and ident.systemid.isdigit()
    assert repl.show("wal_level") == "logical"


def test_exported_snapshot_shows_rows_as_of_slot_creation(
    pg_dsn: str, repl: ReplicationConnection
) -> None:
    _insert(pg_dsn, 1, 2)
    created = repl.create_slot(SLOT, export_snapshot=True)
    assert created.slot_name == SLOT and created.snapshot_name
    _insert(pg_dsn, 3)  # after the slot: not in the snapshot, but in the stream
    with psycopg.connect(pg_dsn) as reader:
        reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        reader.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(created.snapshot_name))
        assert [r[0] for r in reader.execute("SELECT id FROM items ORDER BY id")] == [1, 2]
        reader.rollback()
    repl.start_replication(SLOT, created.consistent_point, publication_names=[PUB])
    (txn,) = read_txns(repl, 1)
    assert txn.ids == [3]


def test_exported_snapshot_dies_with_the_next_command(
    pg_dsn: str, repl: ReplicationConnection
) -> None:
    created = repl.create_slot(SLOT, export_snapshot=True)
    repl.identify_system()  # any command ends the exported snapshot
    with psycopg.connect(pg_dsn) as reader:
        reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with pytest.raises(psycopg.errors.UndefinedObject, match="does not exist"):
            reader.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(created.snapshot_name))


@pytest.mark.parametrize("proto_version", [1, 2])
def test_stream_delivers_begin_insert_message_commit(
    pg_dsn: str, repl: ReplicationConnection, proto_version: int
) -> None:
    created = repl.create_slot(SLOT, export_snapshot=False)
    assert created.snapshot_name is None
    repl.start_replication(SLOT, publication_names=[PUB], proto_version=proto_version)
    with psycopg.connect(pg_dsn) as conn:  # one transaction: a row and a logical message
        conn.execute("INSERT INTO items VALUES (7, 'seven')")
        conn.execute("SELECT pg_logical_emit_message(true, 'slipstream', 'hello')")
    (txn,) = read_txns(repl, 1)
    assert txn.kinds == [b"B", b"R", b"I", b"M", b"C"]
    assert txn.ids == [7] and txn.end_lsn > created.consistent_point
    with pytest.raises(ReplicationStateError):
        repl.identify_system()  # no commands while streaming


def test_send_status_moves_confirmed_flush_to_exactly_what_was_reported(
    pg_dsn: str, repl: ReplicationConnection
) -> None:
    created = repl.create_slot(SLOT, export_snapshot=False)
    repl.status_interval = 0.1  # periodic updates fire during the test; they must not overreach
    repl.start_replication(SLOT, publication_names=[PUB])
    _insert(pg_dsn, 1, 2, 3)
    t1, _t2, t3 = read_txns(repl, 3)

    def read_a_bit() -> None:
        repl.read_message(timeout=0.05)

    _read_for(repl, 0.5)  # received everything, reported nothing
    assert _slot_row(pg_dsn)[0] == created.consistent_point

    repl.send_status(flushed=t1.end_lsn)
    assert repl.reported == (t1.end_lsn, t1.end_lsn, t1.end_lsn)
    assert _until(lambda: _slot_row(pg_dsn)[0] == t1.end_lsn, 5, read_a_bit)
    _read_for(repl, 0.6)  # periodic updates and keepalives flow meanwhile
    assert _slot_row(pg_dsn)[0] == t1.end_lsn  # never beyond what was reported

    with pytest.raises(ValidationError):
        repl.send_status(flushed=t1.end_lsn - 1)  # backwards: refused, nothing sent
    repl.send_status(flushed=t3.end_lsn)
    assert _until(lambda: _slot_row(pg_dsn)[0] == t3.end_lsn, 5, read_a_bit)


def test_keepalive_requesting_a_reply_is_answered(pg_dsn: str) -> None:
    """With wal_sender_timeout=2s and no periodic updates, only replies keep the link alive."""
    _setup(pg_dsn)
    dsn = psycopg.conninfo.make_conninfo(pg_dsn, options="-c wal_sender_timeout=2s")
    with ReplicationConnection.connect(dsn, status_interval=3600, receive_timeout=None) as conn:
        assert conn.show("wal_sender_timeout") == "2s"
        conn.create_slot(SLOT, export_snapshot=False)
        conn.start_replication(SLOT, publication_names=[PUB])
        pid = conn.backend_pid
        idle = _read_for(conn, 6)
        asked = [m for m in idle if isinstance(m, Keepalive) and m.reply_requested]
        assert len(asked) >= 2
        _insert(pg_dsn, 1)
        (txn,) = read_txns(conn, 1)
        assert txn.ids == [1] and conn.backend_pid == pid and _slot_row(pg_dsn)[1] == pid


def test_periodic_status_updates_reach_the_server(pg_dsn: str, repl: ReplicationConnection) -> None:
    repl.status_interval = 0.3
    repl.create_slot(SLOT, export_snapshot=False)
    repl.start_replication(SLOT, publication_names=[PUB])

    def reply_time() -> object:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT reply_time FROM pg_stat_replication WHERE pid = %s", (repl.backend_pid,)
            ).fetchone()
        return row[0] if row else None

    _read_for(repl, 0.6)
    first = reply_time()
    assert first is not None  # a status update went out without the caller sending one
    _read_for(repl, 0.8)
    assert reply_time() > first  # type: ignore[operator]


def test_slot_active_elsewhere_raises_slot_in_use(pg_dsn: str, repl: ReplicationConnection) -> None:
    repl.create_slot(SLOT, export_snapshot=False)
    repl.start_replication(SLOT, publication_names=[PUB])
    with ReplicationConnection.connect(pg_dsn) as other:
        with pytest.raises(SlotInUseError) as info:
            other.start_replication(SLOT, publication_names=[PUB])
        assert classify(info.value) == "retry" and SLOT in str(info.value)
        assert not other.closed  # the connection is still usable for commands
        assert other.identify_system().dbname


def test_missing_and_duplicate_slots(pg_dsn: str, repl: ReplicationConnection) -> None:
    with pytest.raises(SlotNotFoundError):
        repl.start_replication("nope", publication_names=[PUB])
    with pytest.raises(SlotNotFoundError):
        repl.drop_slot("nope")
    repl.create_slot(SLOT, export_snapshot=False)
    with pytest.raises(SlotAlreadyExistsError):
        repl.create_slot(SLOT, export_snapshot=False)
    repl.drop_slot(SLOT)
    repl.create_slot(SLOT, export_snapshot=False, temporary=True)
    with pytest.raises(SlotAlreadyExistsError):
        repl.create_slot(SLOT, export_snapshot=False)
    with pytest.raises(SlotNotFoundError):  # as documented: a failed command drops temporary slots
        repl.drop_slot(SLOT)
    with pytest.raises(InvalidIdentifierError):
        repl.create_slot("Bad-Name", export_snapshot=False)
    with pytest.raises(ReplicationStateError):
        repl.read_message(timeout=0)


def test_role_without_replication_gets_what_to_grant(pg_server, pg_dsn: str) -> None:
    role = "norepl_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        with pytest.raises(ReplicationPermissionError) as info:
            ReplicationConnection.connect(psycopg.conninfo.make_conninfo(pg_dsn, user=role))
        assert f"ALTER ROLE {role} WITH REPLICATION;" in str(info.value)
        assert classify(info.value) == "stop"
    finally:
        with psycopg.connect(pg_server.admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_wal_level_below_logical_says_how_to_fix(pg_server) -> None:
    if pg_server.embedded is None:
        pytest.skip("needs the embedded server to start a second one with wal_level=replica")
    from slipstream.worker.localpg import EmbeddedPostgres

    with (
        EmbeddedPostgres(durable=False, settings={"wal_level": "replica"}) as server,
        ReplicationConnection.connect(server.dsn()) as conn,
        pytest.raises(WalLevelError) as info,
    ):
        conn.create_slot(SLOT, export_snapshot=False)
    assert "wal_level = logical" in str(info.value) and classify(info.value) == "stop"


def _expect_connection_error(
    conn: ReplicationConnection, within: float = 5.0, timeout: float = 0.2
) -> ReplicationConnectionError:
    """Read until the connection fails. `timeout=0` reads as the worker's loop does:
    what is ready now, then a sleep (the loop's poll) before the next look."""
    deadline = time.monotonic() + within
    with pytest.raises(ReplicationConnectionError) as info:
        while time.monotonic() < deadline:
            if conn.read_message(timeout=timeout) is None and timeout == 0:
                time.sleep(0.02)
    assert conn.closed and classify(info.value) == "retry"
    return info.value


READ_WAYS = pytest.mark.parametrize("read_timeout", [0.2, 0], ids=["waiting", "ready-only"])


@READ_WAYS
def test_terminated_walsender_raises_connection_error(
    pg_dsn: str, repl: ReplicationConnection, read_timeout: float
) -> None:
    repl.create_slot(SLOT, export_snapshot=False)
    repl.start_replication(SLOT, publication_names=[PUB])
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_replication WHERE pid = %s",
            (repl.backend_pid,),
        ).fetchone()
    assert row == (True,)
    error = _expect_connection_error(repl, timeout=read_timeout)
    assert error.sqlstate == "57P01"


@READ_WAYS
def test_silent_network_is_detected_by_receive_timeout(pg_dsn: str, read_timeout: float) -> None:
    _setup(pg_dsn)
    with Proxy.for_dsn(pg_dsn) as proxy:
        conn = ReplicationConnection.connect(proxy.dsn(pg_dsn), receive_timeout=1.0)
        conn.create_slot(SLOT, export_snapshot=False)
        conn.start_replication(SLOT, publication_names=[PUB])
        _read_for(conn, 0.2)
        proxy.pause()  # no bytes, no error: only the client's own timer can notice
        started = time.monotonic()
        error = _expect_connection_error(conn, within=4, timeout=read_timeout)
        assert time.monotonic() - started < 2.5 and "no message from the server" in str(error)


def test_ready_only_reads_deliver_the_stream_and_see_a_cut(pg_dsn: str) -> None:
    """`read_message(timeout=0)` takes what libpq holds or the socket has ready without
    waiting: every message still arrives, in order, and a cut connection still fails
    with the typed, retryable error."""
    _setup(pg_dsn)
    with Proxy.for_dsn(pg_dsn) as proxy:
        conn = ReplicationConnection.connect(proxy.dsn(pg_dsn))
        conn.create_slot(SLOT, export_snapshot=False)
        conn.start_replication(SLOT, publication_names=[PUB])
        _insert(pg_dsn, 1, 2, 3)
        txns = read_txns(conn, 3, read_timeout=0)
        assert [t.ids for t in txns] == [[1], [2], [3]]
        assert all(t.kinds == [b"B", b"R", b"I", b"C"] if i == 0 else t.kinds == [b"B", b"I", b"C"]
                   for i, t in enumerate(txns))
        proxy.cut()
        _expect_connection_error(conn, timeout=0)


def test_cut_mid_stream_then_resume_from_last_flushed_lsn(pg_dsn: str) -> None:
    _setup(pg_dsn)
    with ReplicationConnection.connect(pg_dsn) as conn:
        conn.create_slot(SLOT, export_snapshot=False)
    all_ids = list(range(1, 11))
    _insert(pg_dsn, *all_ids)
    policy = RetryPolicy(initial_delay=0.05, max_delay=0.5, max_attempts=40)
    with Proxy.for_dsn(pg_dsn) as proxy:
        first = ReplicationConnection.connect(proxy.dsn(pg_dsn))
        first.start_replication(SLOT, publication_names=[PUB])
        delivered: list[int] = []

        def flush(txn: Txn) -> None:  # "apply", then report the transaction as flushed
            delivered.extend(txn.ids)
            first.send_status(flushed=txn.end_lsn)

        txns = read_txns(first, 5, on_commit=flush)
        flushed = txns[-1].end_lsn
        assert _until(lambda: _slot_row(pg_dsn)[0] == flushed, 5)
        proxy.cut()
        _expect_connection_error(first)

        attempt = 0
        while True:  # the worker's reconnect loop, in miniature
            try:
                second = ReplicationConnection.connect(proxy.dsn(pg_dsn))
                second.start_replication(SLOT, flushed, publication_names=[PUB])
                break
            except SlipstreamError as exc:
                decision = policy.decide(exc, attempt)
                assert decision.action == "retry", decision.reason
                time.sleep(decision.delay)
                attempt += 1
        with second:
            rest = read_txns(second, len(all_ids) - len(delivered))
    resumed = [i for t in rest for i in t.ids]
    assert delivered == all_ids[:5] and resumed == all_ids[5:]  # nothing lost, nothing twice


def test_connect_gives_up_after_connect_timeout(pg_dsn: str) -> None:
    with Proxy.for_dsn(pg_dsn) as proxy:
        proxy.pause()  # the TCP handshake succeeds, then the server never answers
        started = time.monotonic()
        with pytest.raises(ReplicationConnectionError, match="connect_timeout"):
            ReplicationConnection.connect(proxy.dsn(pg_dsn), connect_timeout=0.5)
        assert time.monotonic() - started < 2
