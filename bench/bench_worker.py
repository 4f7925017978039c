"""Worker benchmarks: apply throughput against a COPY floor, and commit-to-searchable latency.

    python bench/bench_worker.py                 # 50k inserts + 50k updates, then latency
    python bench/bench_worker.py --rows 10000 --latency-seconds 10

Throughput: the source table's changes are written while the worker is stopped, then
the worker is started and timed until it has applied them all (decode, map, analyse,
embed with HashingEmbedder(384), write). The floor is a COPY of the same final search
rows into an identical, identically indexed table, timed in the same run. Both are
measured with the HNSW index and in exact-scan mode (no HNSW index).

Latency: a writer commits single-row transactions at a fixed rate; for each one the
time from its source commit to the commit of the apply transaction that made it
searchable is recorded.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psycopg

sys.path.insert(0, os.path.dirname(__file__))

from corpus import Corpus
from slipstream.worker.app import Worker
from slipstream.worker.config import load_config
from slipstream.worker.localpg import EmbeddedPostgres
from slipstream.worker.lsn import parse_lsn

CONFIG = """
[source]
dsn = "{dsn}"
slot = "{slot}"
[search]
hnsw = {hnsw}
[spaces]
local = 384
[embedders.local]
kind = "hashing"
[worker]
http_port = 0
batch_max_changes = 2000
[tables."public.items"]
object_type = "item"
title = "{{title}}"
body = "{{body}}"
partition = "tenant-{{tenant}}"
attrs = ["tenant"]
"""


def make_db(server: EmbeddedPostgres, name: str) -> str:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    dsn = server.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, tenant int NOT NULL, title text, body text)")
    return dsn


def worker_for(dsn: str, hnsw: bool) -> Worker:
    path = Path(tempfile.mkdtemp()) / "bench.toml"
    slot = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    path.write_text(CONFIG.format(dsn=dsn, slot=slot, hnsw="true" if hnsw else "false"))
    return Worker(load_config(path))


def catch_up(worker: Worker, dsn: str) -> float:
    """Start the worker, time until everything committed so far is applied, stop it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        (goal,) = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    runner = worker.runner()
    thread = threading.Thread(target=runner.run, daemon=True)
    started = time.perf_counter()
    thread.start()
    while runner.flushed < parse_lsn(goal):
        if not thread.is_alive():
            raise RuntimeError("worker stopped")
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    runner.stop()
    thread.join()
    return elapsed


def copy_floor(dsn: str, hnsw: bool) -> float:
    """COPY the final search rows into an identical, identically indexed table; seconds."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS slipstream.floor")
        conn.execute("CREATE TABLE slipstream.floor (LIKE slipstream.docs INCLUDING ALL)")
        if not hnsw:
            for (name,) in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'floor' "
                                        "AND indexdef LIKE '%hnsw%'").fetchall():
                conn.execute(f"DROP INDEX slipstream.{name}")
        buf = bytearray()
        with conn.cursor().copy("COPY (SELECT * FROM slipstream.docs) TO STDOUT") as copy:
            for data in copy:
                buf += data
        started = time.perf_counter()
        with conn.transaction(), conn.cursor().copy("COPY slipstream.floor FROM STDIN") as copy:
            copy.write(bytes(buf))
        elapsed = time.perf_counter() - started
        conn.execute("DROP TABLE slipstream.floor")
    return elapsed


def throughput(server: EmbeddedPostgres, rows: int, hnsw: bool, table: list) -> None:
    mode = "HNSW" if hnsw else "exact-scan"
    dsn = make_db(server, f"bench_{'hnsw' if hnsw else 'exact'}")
    worker = worker_for(dsn, hnsw)
    worker.setup()
    corpus = Corpus(seed=3)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(0, rows, 1000):
            with conn.transaction(), conn.cursor().copy(
                    "COPY items (id, tenant, title, body) FROM STDIN") as copy:
                for i in range(start, min(rows, start + 1000)):
                    copy.write_row((i, i % 100, corpus.words(6), corpus.words(50)))
    t_ins = catch_up(worker, dsn)
    floor_ins = copy_floor(dsn, hnsw)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(0, rows, 1000):
            conn.execute("UPDATE items SET title = title || ' revised', body = body || ' edited' "
                         "WHERE id >= %s AND id < %s", (start, start + 1000))
    t_upd = catch_up(worker, dsn)
    floor_upd = copy_floor(dsn, hnsw)
    worker.close()
    for what, t, floor in (("inserts", t_ins, floor_ins), ("updates", t_upd, floor_upd)):
        table.append((f"Apply {rows:,} {what}, {mode}", f"{rows / t:,.0f} changes/s",
                      f"COPY floor {rows / floor:,.0f} rows/s", f"ratio {floor / t:.2f}"))


def latency(server: EmbeddedPostgres, rate: int, seconds: float, hnsw: bool, table: list) -> None:
    dsn = make_db(server, f"bench_latency_{'hnsw' if hnsw else 'exact'}")
    worker = worker_for(dsn, hnsw)
    worker.setup()
    samples: list[float] = []
    runner = worker.runner()
    inner = runner.on_batch

    def on_batch(result, batch) -> None:
        now = time.time()
        samples.extend(now - t.commit_ts for t in batch.completed)
        if inner is not None:
            inner(result, batch)

    runner.on_batch = on_batch
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    while not runner.ready.is_set():
        time.sleep(0.01)
    corpus = Corpus(seed=5)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = on")
        n = int(rate * seconds)
        started = time.perf_counter()
        for i in range(n):
            conn.execute("INSERT INTO items VALUES (%s, %s, %s, %s)",
                         (i, i % 100, corpus.words(6), corpus.words(40)))
            delay = started + (i + 1) / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    time.sleep(1.0)
    runner.stop()
    thread.join()
    worker.close()
    ms = np.asarray(samples) * 1000
    mode = "HNSW" if hnsw else "exact-scan"
    table.append((f"Commit-to-searchable, {rate} changes/s for {seconds:.0f} s ({len(ms)} txns), {mode}",
                  f"p50 {np.percentile(ms, 50):.1f} ms", f"p99 {np.percentile(ms, 99):.1f} ms", ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--latency-seconds", type=float, default=30)
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    from slipstream.worker.logs import configure_logging

    configure_logging(json=True, level="error")
    table: list[tuple] = []
    with EmbeddedPostgres(settings={"maintenance_work_mem": "512MB"}) as server:
        if not args.skip_throughput:
            for hnsw in (True, False):
                throughput(server, args.rows, hnsw, table)
        for hnsw in (False, True):
            latency(server, args.rate, args.latency_seconds, hnsw, table)
    print(f"\nslipstream worker benchmark — {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, embedded PostgreSQL 18 (durable settings)\n")
    width = max(len(r[0]) for r in table)
    print(f"| {'what'.ljust(width)} | result | floor | |")
    print(f"|{'-' * (width + 2)}|---|---|---|")
    for row in table:
        print(f"| {row[0].ljust(width)} | " + " | ".join(row[1:]) + " |")


if __name__ == "__main__":
    main()
