"""Observability: log lines, metrics exposition, the health server, and slot lag.

Logging tests reset structlog around each test (loggers are cached on first use, so
configuration must come before the first log call) and restore the root logger.
The health server is exercised over real HTTP on a free port; slot lag against the
session's Postgres.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from slipstream.index.errors import ConfigurationError, SlipstreamError, ValidationError
from slipstream.worker.lsn import format_lsn
from slipstream.worker.observe import (
    BatchLog,
    HealthServer,
    HealthServerError,
    Metrics,
    SlotLag,
    configure_logging,
    get_logger,
    lag_from_slot,
)


@pytest.fixture
def clean_logging(capsys):
    """structlog unconfigured and the root logger as it was, before and after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    structlog.reset_defaults()
    yield capsys
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def _json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # fails if any line is not one JSON object


def _sample(text: str, name: str, labels: str = "") -> float:
    """The value of one sample line `name{labels} value` in exposition text."""
    pattern = "^" + re.escape(name + (("{" + labels + "}") if labels else "")) + r" (\S+)$"
    m = re.search(pattern, text, re.MULTILINE)
    assert m, f"no sample {name}{{{labels}}} in:\n{text}"
    return float(m.group(1))


# --- logging -------------------------------------------------------------------------


def test_json_logging_one_object_per_line_with_utc_timestamp(clean_logging):
    configure_logging(json=True, level="info")
    log = get_logger("slipstream.test")
    log.info("first_event", n=1)
    log.debug("hidden_event")  # below the level: filtered
    log.warning("second_event", table="public.items")
    records = _json_lines(clean_logging.readouterr().out)
    assert [r["event"] for r in records] == ["first_event", "second_event"]
    for r in records:
        assert r["timestamp"].endswith(("Z", "+00:00"))
        datetime.fromisoformat(r["timestamp"])  # valid ISO 8601
        assert r["logger"] == "slipstream.test"
    assert records[0]["level"] == "info" and records[0]["n"] == 1
    assert records[1]["level"] == "warning" and records[1]["table"] == "public.items"


def test_logger_made_before_configuration_follows_it(clean_logging):
    log = get_logger("early")  # as at module scope, before start-up configures logging
    configure_logging(json=True)
    log.info("late_event")
    (record,) = _json_lines(clean_logging.readouterr().out)
    assert record["event"] == "late_event" and record["logger"] == "early"


def test_debug_level_lets_debug_through(clean_logging):
    configure_logging(level="DEBUG")
    get_logger("t").debug("dbg")
    assert [r["event"] for r in _json_lines(clean_logging.readouterr().out)] == ["dbg"]


def test_configure_logging_twice_writes_each_line_once(clean_logging):
    configure_logging()
    configure_logging()
    get_logger("t").info("once")
    logging.getLogger("thirdparty").warning("stdlib %s", "once")
    records = _json_lines(clean_logging.readouterr().out)
    assert [r["event"] for r in records] == ["once", "stdlib once"]


def test_stdlib_records_share_the_json_stream(clean_logging):
    configure_logging(level="info")
    logging.getLogger("thirdparty.pool").info("pool %s", "grown")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("slipstream.index.search").exception("query failed")
    logging.getLogger("noisy").debug("not shown")
    first, second = _json_lines(clean_logging.readouterr().out)
    assert first["event"] == "pool grown" and first["logger"] == "thirdparty.pool"
    assert first["level"] == "info" and first["timestamp"].endswith(("Z", "+00:00"))
    assert second["level"] == "error" and "RuntimeError: boom" in second["exception"]
    assert set(first) == {"event", "level", "logger", "timestamp"}


def test_console_renderer_is_not_json(clean_logging):
    configure_logging(json=False)
    get_logger("t").info("human_event", k="v")
    out = clean_logging.readouterr().out
    assert "human_event" in out and "k=v" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.splitlines()[0])


def test_bad_level_is_a_configuration_error(clean_logging):
    with pytest.raises(ConfigurationError, match="verbose"):
        configure_logging(level="verbose")


# --- metrics -------------------------------------------------------------------------


def test_render_shows_updated_values():
    m = Metrics()
    m.slot_lag_bytes.set(4096)
    m.slot_lag_seconds.set(1.5)
    m.count_changes("upsert", 7)
    m.applied_changes_total.labels(op="delete").inc(2)
    m.applied_transactions_total.inc(3)
    m.apply_batch_seconds.observe(0.02)
    m.batch_changes.observe(9)
    m.dead_letters_total.labels(table="public.items").inc()
    m.pending_embeddings.labels(space="local").set(11)
    m.checkpoint_lsn.set(0x16_B374D848)
    m.reconnects_total.labels(reason="timeout").inc()
    m.snapshot_rows_total.labels(table="public.items").inc(100)
    m.observe_commit(datetime.now(UTC) - timedelta(seconds=2))
    text = m.render().decode()
    assert _sample(text, "slipstream_slot_lag_bytes") == 4096
    assert _sample(text, "slipstream_slot_lag_seconds") == 1.5
    assert _sample(text, "slipstream_applied_changes_total", 'op="upsert"') == 7
    assert _sample(text, "slipstream_applied_changes_total", 'op="delete"') == 2
    assert _sample(text, "slipstream_applied_transactions_total") == 3
    assert _sample(text, "slipstream_apply_batch_seconds_bucket", 'le="0.025"') == 1
    assert _sample(text, "slipstream_apply_batch_seconds_bucket", 'le="0.01"') == 0
    assert _sample(text, "slipstream_batch_changes_count") == 1
    assert _sample(text, "slipstream_dead_letters_total", 'table="public.items"') == 1
    assert _sample(text, "slipstream_pending_embeddings", 'space="local"') == 11
    assert _sample(text, "slipstream_checkpoint_lsn") == 0x16_B374D848
    assert _sample(text, "slipstream_reconnects_total", 'reason="timeout"') == 1
    assert _sample(text, "slipstream_snapshot_rows_total", 'table="public.items"') == 100
    assert _sample(text, "slipstream_commit_to_apply_seconds_bucket", 'le="1.0"') == 0
    assert _sample(text, "slipstream_commit_to_apply_seconds_bucket", 'le="2.5"') == 1


def test_apply_histogram_spans_a_millisecond_to_ten_seconds():
    text = Metrics().render().decode()
    bounds = [
        float(b) for b in re.findall(r'slipstream_apply_batch_seconds_bucket\{le="([^"+]+)"', text)
    ]
    assert min(bounds) == 0.001 and max(bounds) == 10.0


def test_both_ops_are_exported_before_any_change():
    text = Metrics().render().decode()
    assert _sample(text, "slipstream_applied_changes_total", 'op="upsert"') == 0
    assert _sample(text, "slipstream_applied_changes_total", 'op="delete"') == 0


def test_unknown_op_is_rejected():
    with pytest.raises(ValidationError, match="insert"):
        Metrics().count_changes("insert")


def test_commit_delay_under_clock_skew_counts_as_zero():
    m = Metrics()
    assert m.observe_commit(datetime.now(UTC) + timedelta(seconds=5)) == 0.0


def test_two_metrics_instances_are_independent():
    a, b = Metrics(), Metrics()
    a.applied_transactions_total.inc(5)
    a.slot_lag_bytes.set(123)
    assert _sample(a.render().decode(), "slipstream_applied_transactions_total") == 5
    assert _sample(b.render().decode(), "slipstream_applied_transactions_total") == 0
    assert _sample(b.render().decode(), "slipstream_slot_lag_bytes") == 0


def test_batch_log_emits_one_line_and_updates_metrics():
    m = Metrics()
    with structlog.testing.capture_logs() as logs:
        BatchLog(m).log_batch(
            structlog.get_logger(),
            transactions=2,
            changes=5,
            bytes=1234,
            lag_bytes=800,
            lag_seconds=0.25,
            duration_s=0.0123,
            first_lsn=0x1_00000010,
            last_lsn=0x1_00000200,
            ops={"upsert": 4, "delete": 1},
        )
    assert len(logs) == 1
    line = logs[0]
    assert line["event"] == "batch_applied" and line["log_level"] == "info"
    assert line["transactions"] == 2 and line["changes"] == 5 and line["bytes"] == 1234
    assert line["lag_bytes"] == 800 and line["lag_seconds"] == 0.25
    assert line["duration_s"] == 0.0123
    assert line["first_lsn"] == "1/10" and line["last_lsn"] == "1/200"
    text = m.render().decode()
    assert _sample(text, "slipstream_applied_transactions_total") == 2
    assert _sample(text, "slipstream_batch_changes_sum") == 5
    assert _sample(text, "slipstream_apply_batch_seconds_sum") == pytest.approx(0.0123)
    assert _sample(text, "slipstream_slot_lag_bytes") == 800
    assert _sample(text, "slipstream_slot_lag_seconds") == 0.25
    assert _sample(text, "slipstream_checkpoint_lsn") == 0x1_00000200
    assert _sample(text, "slipstream_applied_changes_total", 'op="upsert"') == 4
    assert _sample(text, "slipstream_applied_changes_total", 'op="delete"') == 1


def test_batch_log_unknown_lag_leaves_gauges_alone():
    m = Metrics()
    m.slot_lag_bytes.set(10)
    with structlog.testing.capture_logs() as logs:
        BatchLog(m).log_batch(
            structlog.get_logger(),
            transactions=1,
            changes=1,
            bytes=10,
            lag_bytes=None,
            lag_seconds=None,
            duration_s=0.001,
            first_lsn=1,
            last_lsn=2,
        )
    assert logs[0]["lag_bytes"] is None and "ops" not in logs[0]
    assert _sample(m.render().decode(), "slipstream_slot_lag_bytes") == 10


# --- health server -------------------------------------------------------------------


def _get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def test_metrics_endpoint_serves_prometheus_text():
    m = Metrics()
    m.applied_transactions_total.inc(4)
    with HealthServer(m, readiness=lambda: (True, "streaming")) as hs:
        assert hs.port > 0
        status, ctype, body = _get(hs.port, "/metrics")
    assert status == 200 and ctype == CONTENT_TYPE_LATEST
    assert _sample(body.decode(), "slipstream_applied_transactions_total") == 4


def test_readyz_follows_the_readiness_callable():
    state = {"ready": False, "why": "snapshotting public.items"}
    with HealthServer(Metrics(), readiness=lambda: (state["ready"], state["why"])) as hs:
        status, ctype, body = _get(hs.port, "/readyz")
        assert status == 503 and ctype == "application/json"
        assert json.loads(body) == {"ready": False, "reason": "snapshotting public.items"}
        state.update(ready=True, why="streaming")
        status, _, body = _get(hs.port, "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True


def test_readiness_that_raises_is_not_ready():
    def broken() -> tuple[bool, str]:
        raise psycopg.OperationalError("connection refused")

    with HealthServer(Metrics(), readiness=broken) as hs:
        status, _, body = _get(hs.port, "/readyz")
    assert status == 503 and "connection refused" in json.loads(body)["reason"]


def test_healthz_goes_stale_without_a_beat():
    with HealthServer(Metrics(), readiness=lambda: (True, ""), stale_after=0.2) as hs:
        status, _, body = _get(hs.port, "/healthz")
        assert status == 200 and body == b"ok\n"
        time.sleep(0.4)
        status, _, body = _get(hs.port, "/healthz")
        assert status == 503 and b"no heartbeat" in body
        hs.beat()
        assert _get(hs.port, "/healthz")[0] == 200


def test_healthz_uses_the_liveness_callable_when_given():
    alive = {"ok": True}
    with HealthServer(
        Metrics(),
        readiness=lambda: (True, ""),
        liveness=lambda: (alive["ok"], "loop"),
        stale_after=0.01,
    ) as hs:
        time.sleep(0.05)  # would be stale by heartbeat; the callable decides instead
        assert _get(hs.port, "/healthz")[0] == 200
        alive["ok"] = False
        assert _get(hs.port, "/healthz")[0] == 503


def test_unknown_path_is_404_and_query_strings_are_ignored():
    with HealthServer(Metrics(), readiness=lambda: (True, "")) as hs:
        assert _get(hs.port, "/")[0] == 404
        assert _get(hs.port, "/metricsx")[0] == 404
        assert _get(hs.port, "/readyz?verbose=1")[0] == 200


def test_requests_are_not_logged_to_stdout(clean_logging):
    configure_logging(level="info")
    with HealthServer(Metrics(), readiness=lambda: (True, "")) as hs:
        clean_logging.readouterr()
        _get(hs.port, "/metrics")
        _get(hs.port, "/nope")
    out, err = clean_logging.readouterr()
    assert "GET /" not in out and "GET /" not in err


def test_stop_releases_the_port_and_start_is_required_for_port():
    hs = HealthServer(Metrics(), readiness=lambda: (True, ""))
    with pytest.raises(HealthServerError):
        _ = hs.port
    hs.start()
    port = hs.port
    hs.stop()
    hs.stop()  # a second stop is harmless
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_port_in_use_is_a_typed_error():
    with HealthServer(Metrics(), readiness=lambda: (True, "")) as first:
        second = HealthServer(Metrics(), port=first.port, readiness=lambda: (True, ""))
        with pytest.raises(HealthServerError, match=str(first.port)) as info:
            second.start()
    assert isinstance(info.value, SlipstreamError)


# --- slot lag ------------------------------------------------------------------------


def test_lag_from_slot_sees_wal_written_after_the_slot(pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')")
        before = lag_from_slot(conn, "s")
        # The test server runs with synchronous_commit=off; with it on, each commit
        # has written its WAL before returning, so pg_current_wal_lsn() has moved.
        conn.execute("SET synchronous_commit = on")
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO items SELECT g, repeat('x', 100) FROM generate_series(1, 100) g")
        after = lag_from_slot(conn, "s")
    assert isinstance(after, SlotLag)
    assert before is not None and before.lag_bytes is not None
    assert after.lag_bytes > before.lag_bytes and after.lag_bytes > 0
    assert after.confirmed_flush_lsn == before.confirmed_flush_lsn  # nobody consumed
    assert after.restart_lsn is not None and after.restart_lsn <= after.confirmed_flush_lsn
    assert after.active is False and after.wal_status in ("reserved", "extended")
    assert format_lsn(after.confirmed_flush_lsn)  # an int LSN, not text


def test_lag_from_slot_missing_slot_is_none(pg_dsn):
    with psycopg.connect(pg_dsn) as conn:
        assert lag_from_slot(conn, "no_such_slot") is None
        # a non-autocommit connection is not left idle in transaction
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
