"""Index benchmarks: device query latency, server scoped query latency, batch upsert throughput.

    python bench/bench_index.py                      # defaults below
    python bench/bench_index.py --device-rows 10000 --server-rows 20000 --partitions 20

Prints one table. The server part starts an embedded Postgres unless --dsn is given.
Embedding uses HashingEmbedder(384); vectors are computed once, outside the timings.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from corpus import Corpus
from slipstream.index import HashingEmbedder, SearchIndex, SQLiteBackend

DIM = 384


def pct(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def embed_all(embedder: HashingEmbedder, docs) -> dict[int, dict[str, np.ndarray]]:
    vectors = embedder.embed([d.embed_text() for d in docs])
    return {i: {"local": vectors[i]} for i in range(len(docs))}


def write_batches(index: SearchIndex, docs, vectors, batch: int) -> float:
    """Write prepared batches; returns rows/s of the write itself (analysis included)."""
    t0 = time.perf_counter()
    for start in range(0, len(docs), batch):
        chunk = docs[start:start + batch]
        vecs = {i - start: vectors[i] for i in range(start, start + len(chunk))}
        index.backend.write(index.prepare(chunk, vecs))
    return len(docs) / (time.perf_counter() - t0)


def time_queries(index: SearchIndex, queries: list[str], **kw) -> list[float]:
    samples = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q, k=10, **kw)
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def bench_device(rows: int, n_queries: int, table: list[tuple]) -> None:
    corpus = Corpus(seed=rows)
    embedder = HashingEmbedder(DIM)
    docs = corpus.docs(rows, ["user-1"])
    vectors = embed_all(embedder, docs)
    index = SearchIndex(SQLiteBackend(spaces={"local": DIM}), embedder)
    rate = write_batches(index, docs, vectors, 1000)
    table.append((f"SQLite upsert_many, 1k-row batches, {rows:,} rows", f"{rate:,.0f} rows/s", ""))
    queries = corpus.queries(n_queries)
    index.search("warm up", k=10)  # builds the in-memory matrix once
    samples = time_queries(index, queries)
    table.append((f"Device query, SQLite shard {rows:,} rows, {DIM}-d",
                  f"p50 {pct(samples, 50):.2f} ms", f"p95 {pct(samples, 95):.2f} ms"))


def scoped_samples(index: SearchIndex, queries: list[str], scopes: list, limit_s: float) -> list[float]:
    """Wall milliseconds of scoped queries, stopping at `limit_s` seconds."""
    index.search("warm up", partition=scopes[0])
    samples, t_end = [], time.perf_counter() + limit_s
    for q, scope in zip(queries, scopes):
        t0 = time.perf_counter()
        index.search(q, k=10, partition=scope)
        samples.append((time.perf_counter() - t0) * 1000)
        if t0 > t_end:
            break
    return samples


def bench_server(rows: int, partitions: int, n_queries: int, dsn: str | None, table: list[tuple],
                 shared_buffers: str, milestones: list[int], cluster: bool, growth: bool,
                 limit_s: float) -> None:
    from bulkload import BulkCorpus, UnigramEmbedder, bulk_load
    from slipstream.index import PostgresBackend
    from slipstream.worker.embedded import EmbeddedPostgres

    server = None
    if dsn is None:
        server = EmbeddedPostgres(durable=False, settings={
            "maintenance_work_mem": "1GB", "shared_buffers": shared_buffers,
            "max_wal_size": "8GB", "checkpoint_timeout": "30min"}).start()
        dsn = server.dsn()
    try:
        backend = PostgresBackend(dsn, schema="bench", spaces={"local": DIM}, hnsw=False)
        with backend.connection() as conn:
            conn.execute("TRUNCATE bench.docs")
        index = SearchIndex(backend, UnigramEmbedder(DIM))
        corpus = BulkCorpus(DIM)
        names = [f"tenant-{i}" for i in range(partitions)]
        rng = np.random.default_rng(0)
        queries = Corpus(seed=7).queries(n_queries)
        targets = [names[int(i)] for i in rng.integers(0, partitions, n_queries)]
        loaded, load_s, steps = 0, 0.0, sorted({m for m in milestones if m < rows} | {rows})
        for step in steps:
            n, secs = bulk_load(backend, corpus, step - loaded, names, start=loaded,
                                deadline=limit_s * 6)
            loaded, load_s = loaded + n, load_s + secs
            with backend.connection() as conn:
                conn.execute("VACUUM ANALYZE bench.docs")  # the steady state autovacuum keeps
                size = conn.execute("SELECT pg_total_relation_size('bench.docs')").fetchone()[0]
            samples = scoped_samples(index, queries, targets, limit_s)
            table.append((f"Server scoped query (1 partition, {loaded // partitions:,} rows), "
                          f"{loaded:,} rows / {partitions:,} partitions, rows in partition order "
                          f"of arrival; table + indexes {size / 2**30:.1f} GiB",
                          f"p50 {pct(samples, 50):.2f} ms", f"p95 {pct(samples, 95):.2f} ms"))
            if n < step - (loaded - n):
                break
        table.append((f"Server bulk load (binary COPY, vectors in bulk, GIN rebuilt), {loaded:,} rows",
                      f"{loaded / load_s:,.0f} rows/s", f"{load_s:.0f} s"))
        if cluster:
            t0 = time.perf_counter()
            with backend.connection() as conn:
                conn.execute("SET maintenance_work_mem = '1GB'")
                conn.execute("CREATE INDEX IF NOT EXISTS docs_partition_order ON bench.docs (partition)")
                conn.execute("CLUSTER bench.docs USING docs_partition_order")
                conn.execute("VACUUM ANALYZE bench.docs")
            cluster_s = time.perf_counter() - t0
            samples = scoped_samples(index, queries, targets, limit_s)
            table.append((f"Server scoped query, {loaded:,} rows, after CLUSTER by partition "
                          f"({cluster_s:.0f} s)", f"p50 {pct(samples, 50):.2f} ms",
                          f"p95 {pct(samples, 95):.2f} ms"))
        backend.close()
    finally:
        if server is not None:
            server.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device-rows", default="10000,50000")
    ap.add_argument("--server-rows", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=1000)
    ap.add_argument("--milestones", default="100000,300000",
                    help="also measure the fixed-size scoped query at these total sizes")
    ap.add_argument("--cluster", action="store_true", help="then CLUSTER the table by partition and measure again")
    ap.add_argument("--phase-limit", type=float, default=120.0, help="seconds per query phase")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dsn", default=None)
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--shared-buffers", default="6GB", help="for the embedded server (default 6GB)")
    args = ap.parse_args()
    table: list[tuple] = []
    for rows in (int(r) for r in args.device_rows.split(",") if r):
        bench_device(rows, args.queries, table)
    if not args.skip_server:
        bench_server(args.server_rows, args.partitions, args.queries, args.dsn, table,
                     shared_buffers=args.shared_buffers,
                     milestones=[int(m) for m in args.milestones.split(",") if m],
                     cluster=args.cluster, growth=False, limit_s=args.phase_limit)
    print(f"\nslipstream index benchmark — {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {args.queries} queries, k=10\n")
    width = max(len(r[0]) for r in table)
    print(f"| {'what'.ljust(width)} | result | |")
    print(f"|{'-' * (width + 2)}|---|---|")
    for what, a, b in table:
        print(f"| {what.ljust(width)} | {a} | {b} |")


if __name__ == "__main__":
    main()
