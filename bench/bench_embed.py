"""Embedding benchmarks: what the service sees, and apply throughput against a slow, rate-limited one.

    python bench/bench_embed.py                  # 2,000 rows, 1,000 updates, 20 ms service time
    python bench/bench_embed.py --rows 5000 --latency-ms 50 --fault-every 5

A local fake OpenAI-compatible endpoint (tests/fake_openai.py, in a process of its
own so that it does not compete for the worker's GIL) answers each request
after `--latency-ms` of service time, and every `--fault-every`-th request with 429
and ``Retry-After: 0.05``. The worker runs from a TOML configuration with an HTTP
embedder (`batch_size` 32) on an embedded PostgreSQL.

* Apply throughput: `--rows` inserts streamed and applied, with 1, 4 and 8 concurrent
  requests.
* Updates: 1,000 single-row updates of which 10% change the text (the others change a
  column no document uses): texts sent and change-log entries written.
* Cache: `--rows` new rows of which half repeat an existing row's text: texts sent
  and the content-hash cache's hit rate.

Each phase has a hard time limit (`--phase-limit` seconds); a phase over it is stopped
and reported as such. Everything started is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Self

import psycopg

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from corpus import Corpus
import pgdb
from report import print_table
from slipstream.worker.app import Worker
from slipstream.worker.config import load_config
from slipstream.worker.localpg import EmbeddedPostgres
from slipstream.worker.lsn import parse_lsn

DIM = 256
CONFIG = """
[source]
dsn = "{dsn}"
slot = "{slot}"
[search]
hnsw = false
[spaces]
server = {dim}
[embedders.server]
kind = "http"
url = "{url}"
model = "bench-model"
api_key = "sk-bench"
batch_size = 32
concurrency = {concurrency}
retry_initial_delay = 0.05
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


class OverLimit(Exception):
    pass


class FakeService:
    """tests/fake_openai.py in a subprocess; `requests()` reads its counters over HTTP."""

    def __init__(self, model: str, dim: int, latency: float, fault_every: int) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_openai", model, str(dim), str(latency), str(fault_every)],
            cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url:
            self.close()
            raise RuntimeError("the fake embedding service did not start")

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url, timeout=10) as r:
            return json.loads(r.read())

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_db(server: EmbeddedPostgres, name: str) -> str:
    return pgdb.make_db(server, name, "CREATE TABLE items (id int PRIMARY KEY, tenant int NOT NULL, "
                        "title text, body text, views int NOT NULL DEFAULT 0)")


def worker_for(dsn: str, url: str, concurrency: int) -> Worker:
    path = Path(tempfile.mkdtemp()) / "bench.toml"
    slot = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    path.write_text(CONFIG.format(dsn=dsn, slot=slot, url=url, dim=DIM, concurrency=concurrency))
    return Worker(load_config(path))


def catch_up(worker: Worker, dsn: str, limit: float) -> float:
    """Run the worker until everything committed so far is applied; seconds (hard limit)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        (goal,) = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    runner = worker.runner()
    thread = threading.Thread(target=runner.run, daemon=True)
    started = time.perf_counter()
    thread.start()
    try:
        while runner.flushed < parse_lsn(goal):
            if not thread.is_alive():
                raise RuntimeError("worker stopped")
            if time.perf_counter() - started > limit:
                raise OverLimit(f"not caught up after {limit:.0f} s")
            time.sleep(0.01)
        return time.perf_counter() - started
    finally:
        runner.stop()
        thread.join(timeout=30)


def load(dsn: str, rows: int, start: int = 0, texts: list[tuple[str, str]] | None = None) -> None:
    corpus = Corpus(seed=3 + start)
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction(), conn.cursor().copy(
            "COPY items (id, tenant, title, body) FROM STDIN") as copy:
        for i in range(start, start + rows):
            title, body = texts[i - start] if texts else (corpus.words(6), corpus.words(50))
            copy.write_row((i, i % 100, title, body))


def sample(worker: Worker, name: str, **labels: str) -> float:
    return worker.metrics.registry.get_sample_value(f"slipstream_{name}", labels) or 0.0


def embedded(worker: Worker) -> float:
    """Texts the service embedded for the worker (answered requests; retries not counted)."""
    return sample(worker, "embed_texts_total", space="server")


def change_count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return int(conn.execute("SELECT count(*) FROM slipstream.changes").fetchone()[0])


def throughput(server, fake: FakeService, rows: int, concurrency: int, limit: float,
               table: list) -> tuple[Worker, str] | None:
    dsn = make_db(server, f"bench_embed_c{concurrency}")
    worker = worker_for(dsn, fake.url, concurrency)
    worker.setup()
    load(dsn, rows)
    before = fake.stats()["requests"]
    try:
        seconds = catch_up(worker, dsn, limit)
    except OverLimit as exc:
        table.append((f"Apply {rows:,} inserts, {concurrency} concurrent requests", "over limit",
                      str(exc), ""))
        worker.close()
        return None
    retries = sample(worker, "embed_retries_total", space="server", reason="429")
    table.append((f"Apply {rows:,} inserts, {concurrency} concurrent request(s)",
                  f"{rows / seconds:,.0f} rows/s",
                  f"{fake.stats()['requests'] - before:,} requests, {retries:.0f} retried after 429",
                  f"{seconds:.1f} s"))
    return worker, dsn


def updates(worker: Worker, dsn: str, fake: FakeService, rows: int, limit: float,
            table: list) -> None:
    rng = random.Random(7)
    sent, logged = embedded(worker), change_count(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in range(1000):
            row = rng.randrange(rows)
            if n % 10 == 0:
                conn.execute("UPDATE items SET body = body || %s WHERE id = %s", (f" edit {n}", row))
            else:
                conn.execute("UPDATE items SET views = views + 1 WHERE id = %s", (row,))
    try:
        seconds = catch_up(worker, dsn, limit)
    except OverLimit as exc:
        table.append(("1,000 updates, 10% changing text", "over limit", str(exc), ""))
        return
    table.append(("1,000 updates, 10% changing text", f"{embedded(worker) - sent:,.0f} texts embedded",
                  f"{change_count(dsn) - logged:,} change-log entries", f"{seconds:.1f} s"))


def cache(worker: Worker, dsn: str, fake: FakeService, rows: int, limit: float,
          table: list) -> None:
    with psycopg.connect(dsn) as conn:
        existing = conn.execute("SELECT title, body FROM items ORDER BY id LIMIT %s",
                                (rows // 2,)).fetchall()
    corpus = Corpus(seed=11)
    texts = [tuple(t) for t in existing] + [(corpus.words(6), corpus.words(50))
                                           for _ in range(rows - len(existing))]
    random.Random(3).shuffle(texts)
    hits0 = sample(worker, "embed_cache_total", space="server", result="hit")
    miss0 = sample(worker, "embed_cache_total", space="server", result="miss")
    sent = embedded(worker)
    load(dsn, rows, start=10_000_000, texts=texts)
    try:
        seconds = catch_up(worker, dsn, limit)
    except OverLimit as exc:
        table.append((f"{rows:,} new rows, half repeating a text", "over limit", str(exc), ""))
        return
    hits = sample(worker, "embed_cache_total", space="server", result="hit") - hits0
    misses = sample(worker, "embed_cache_total", space="server", result="miss") - miss0
    table.append((f"{rows:,} new rows, half repeating a text", f"{embedded(worker) - sent:,.0f} texts embedded",
                  f"cache hit rate {hits / max(1, hits + misses):.0%}", f"{seconds:.1f} s"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--fault-every", type=int, default=10)
    ap.add_argument("--phase-limit", type=float, default=300)
    args = ap.parse_args()
    from slipstream.worker.observe import configure_logging

    configure_logging(json=True, level=os.environ.get("BENCH_LOG", "error"))
    table: list[tuple] = []
    with EmbeddedPostgres() as server, FakeService("bench-model", DIM, args.latency_ms / 1000,
                                                  args.fault_every) as fake:
        kept = None
        for concurrency in (1, 4, 8):
            got = throughput(server, fake, args.rows, concurrency, args.phase_limit, table)
            if got is not None:
                if kept is not None:
                    kept[0].close()
                kept = got
        if kept is not None:
            worker, dsn = kept
            updates(worker, dsn, fake, args.rows, args.phase_limit, table)
            cache(worker, dsn, fake, args.rows, args.phase_limit, table)
            worker.close()
    print_table(f"slipstream embedding benchmark — {platform.machine()}, {os.cpu_count()} cores "
                f"(shared), Python {platform.python_version()}, embedded PostgreSQL; fake service: "
                f"{args.latency_ms:.0f} ms a request, 429 on every {args.fault_every}th",
                ("what", "result", "detail", "time"), table)


if __name__ == "__main__":
    main()
