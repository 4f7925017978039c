"""`/metrics` of the real worker (`slipstream run`) under a writer: every metric the README
lists has a sample, fed by the worker itself, with a value that fits what was written.

The worker runs as a subprocess from a TOML file, as deployed. Before it starts, rows
exist (the initial copy); while it runs, a writer commits single-row transactions,
one row makes a Python mapper raise (a dead letter), a second embedding space points
at an endpoint that refuses connections (pending embeddings), and the test terminates
the worker's walsender once (a reconnect).
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from .cli_harness import WorkerProcess, environ, free_port, query, run_sql, write_config
from .test_docs import readme_metrics

TABLE_DDL = """
CREATE TABLE public.notes (
    id serial PRIMARY KEY,
    owner_id int NOT NULL,
    title text NOT NULL,
    body text NOT NULL DEFAULT ''
)
"""

MAPPERS = '''
from slipstream.index import IndexDoc
from slipstream.worker.mapping import register


@register("public.notes")
def notes(row, op):
    if row["title"] == "boom":
        raise RuntimeError("this row cannot be mapped")
    return [IndexDoc("note", str(row["id"]), title=row["title"], body=row["body"],
                     partition=f"user-{row['owner_id']}", embed_spaces=("local", "remote"))]
'''

COPIED, WRITTEN, DELETED = 30, 40, 5

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def scrape(port: int) -> dict[str, dict[str, float]]:
    """name -> {label text: value} from the exposition at /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out.setdefault(m["name"], {})[m["labels"] or ""] = float(m["value"])
    return out


def one(samples: dict[str, dict[str, float]], name: str, labels: str = "") -> float:
    assert name in samples, f"no sample of {name}; exported: {sorted(samples)}"
    assert labels in samples[name], f"{name} has no sample {{{labels}}}: {samples[name]}"
    return samples[name][labels]


@pytest.fixture
def worker(pg_dsn: str, tmp_path: Path):
    run_sql(pg_dsn, TABLE_DDL)
    run_sql(pg_dsn, "INSERT INTO notes (owner_id, title, body) "
                    f"SELECT g % 3, 'copied ' || g, 'existing row' FROM generate_series(1, {COPIED}) g")
    (tmp_path / "live_mappers.py").write_text(MAPPERS)
    port = free_port()
    refused = free_port()  # nothing listens there: the remote embedder fails at once
    config = write_config(
        tmp_path / "slipstream.toml", pg_dsn, "",
        worker={"http_port": port, "metrics_interval_seconds": 0.3,
                "mapper_modules": ["live_mappers"]})
    # A second space whose embedder refuses connections: its rows stay pending.
    config.write_text(config.read_text().replace(
        "[spaces]\nlocal = 16\n", "[spaces]\nlocal = 16\nremote = 8\n").replace(
        '[embedders.local]\nkind = "hashing"\n',
        '[embedders.local]\nkind = "hashing"\n\n[embedders.remote]\nkind = "http"\n'
        f'url = "http://127.0.0.1:{refused}/v1"\nmodel = "m"\ntimeout = 1.0\n'))
    proc = WorkerProcess(config, cwd=tmp_path, http=True,
                         env=environ(pythonpath=tmp_path))
    with proc:
        yield proc, port


def test_every_readme_metric_is_fed_by_the_running_worker(pg_dsn: str, worker) -> None:
    proc, port = worker
    proc.wait_streaming(pg_dsn, timeout=60)
    for i in range(WRITTEN // 2):
        title = "boom" if i == 7 else f"written {i}"
        run_sql(pg_dsn, "INSERT INTO notes (owner_id, title, body) VALUES (%s, %s, 'new')",
                params=(i % 3, title))
        time.sleep(0.01)
    # The other half as a burst of single-row transactions, so that batches carry several.
    with psycopg.connect(pg_dsn, autocommit=True) as conn, conn.pipeline() as pipeline:
        for i in range(WRITTEN // 2, WRITTEN):
            conn.execute("INSERT INTO notes (owner_id, title, body) VALUES (%s, %s, 'new')",
                         (i % 3, f"written {i}"))
            pipeline.sync()  # ends the implicit transaction: one per row, without a round trip
    run_sql(pg_dsn, f"DELETE FROM notes WHERE id <= {DELETED}")
    proc.wait_caught_up(pg_dsn, timeout=60)

    # One reconnect: end the worker's walsender, then write and wait until it has caught up.
    (pid,), = query(pg_dsn, "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'slipstream'")
    run_sql(pg_dsn, "SELECT pg_terminate_backend(%s)", params=(pid,))
    run_sql(pg_dsn, "INSERT INTO notes (owner_id, title) VALUES (1, 'after the reconnect')")
    proc.wait_for("a new walsender", lambda: query(
        pg_dsn, "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'slipstream'")[0][0]
        not in (None, pid), timeout=60)
    proc.wait_caught_up(pg_dsn, timeout=60)
    proc.wait_for("the HNSW queue drained", lambda: query(
        pg_dsn, "SELECT count(*) FROM slipstream.ann_queue")[0][0] == 0, timeout=60)
    time.sleep(1.0)  # two lag-poller ticks after the last batch

    transactions = WRITTEN + 2  # the inserts, the delete, the insert after the reconnect
    s = scrape(port)
    (wal_gap,), = query(pg_dsn, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)"
                                "::bigint FROM pg_replication_slots WHERE slot_name = 'slipstream'")
    checks = {
        "slipstream_slot_lag_bytes":
            lambda: 0 <= one(s, "slipstream_slot_lag_bytes") <= max(wal_gap, 0) + 1024 * 1024,
        "slipstream_slot_lag_seconds": lambda: 0 <= one(s, "slipstream_slot_lag_seconds") < 60,
        "slipstream_commit_to_apply_seconds":
            # every transaction is observed, not only each batch's last
            lambda: one(s, "slipstream_commit_to_apply_seconds_count")
            == one(s, "slipstream_applied_transactions_total") >= transactions,
        "slipstream_apply_rate": lambda: one(s, "slipstream_apply_rate") > 0,
        "slipstream_applied_changes_total":
            lambda: one(s, "slipstream_applied_changes_total", 'op="upsert"') >= WRITTEN - 1
            and one(s, "slipstream_applied_changes_total", 'op="delete"') >= DELETED,
        "slipstream_applied_transactions_total":
            lambda: one(s, "slipstream_applied_transactions_total") >= transactions,
        "slipstream_apply_batch_seconds":
            lambda: one(s, "slipstream_apply_batch_seconds_count") >= 1
            and 0 < one(s, "slipstream_apply_batch_seconds_sum") < 120,
        "slipstream_batch_changes":
            lambda: one(s, "slipstream_batch_changes_sum") >= WRITTEN + DELETED + 1,
        "slipstream_checkpoint_lsn": lambda: one(s, "slipstream_checkpoint_lsn") > 0,
        "slipstream_dead_letters_total":
            lambda: one(s, "slipstream_dead_letters_total", 'table="public.notes"') == 1,
        "slipstream_pending_embeddings":
            # every live row waits for its "remote" vector; "local" never fails
            lambda: one(s, "slipstream_pending_embeddings", 'space="remote"')
            == COPIED + WRITTEN - 1 - DELETED + 1
            and one(s, "slipstream_pending_embeddings", 'space="local"') == 0,
        "slipstream_ann_queue_rows": lambda: one(s, "slipstream_ann_queue_rows") == 0,
        "slipstream_reconnects_total":
            lambda: sum(s.get("slipstream_reconnects_total", {}).values()) >= 1,
        "slipstream_snapshot_rows_total":
            lambda: one(s, "slipstream_snapshot_rows_total", 'table="public.notes"') == COPIED,
    }
    # Batches carried several transactions, so a count per batch would fall short.
    assert one(s, "slipstream_apply_batch_seconds_count") < transactions
    listed = readme_metrics()
    assert set(listed) == set(checks), "the README's metrics table and this test disagree"
    failed = [name for name, check in checks.items() if not check()]
    assert not failed, f"implausible or missing: {failed}\n" + "\n".join(
        f"{k} {v}" for k, v in sorted(s.items()) if k.startswith("slipstream_"))
    # The canonical batch line carries the slot lag the poller read (it was always None).
    batches = [e for e in proc.events() if e.get("event") == "batch_applied"]
    assert batches and isinstance(batches[-1]["lag_bytes"], int), batches[-1:]
    reasons = set(s["slipstream_reconnects_total"])
    assert all(re.fullmatch(r'reason="[A-Za-z]+Error"', r) for r in reasons), reasons
