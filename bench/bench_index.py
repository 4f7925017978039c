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


def bench_server(rows: int, partitions: int, n_queries: int, dsn: str | None, table: list[tuple],
                 build_hnsw: bool, shared_buffers: str) -> None:
    from slipstream.index import PostgresBackend
    from slipstream.worker.localpg import EmbeddedPostgres

    server = None
    if dsn is None:
        server = EmbeddedPostgres(settings={"maintenance_work_mem": "1GB",
                                            "shared_buffers": shared_buffers}).start()
        dsn = server.dsn()
    try:
        # Loaded without the HNSW index (exact-scan mode), which is then built once at the
        # end: a scoped query below the exact-scan limit never uses it, and building it
        # after the load is how a large index is made in practice.
        backend = PostgresBackend(dsn, schema="bench", spaces={"local": DIM}, hnsw=False)
        with backend.connection() as conn:
            conn.execute("TRUNCATE bench.docs")
        embedder = HashingEmbedder(DIM)
        index = SearchIndex(backend, embedder)
        corpus = Corpus(seed=7)
        names = [f"tenant-{i}" for i in range(partitions)]
        chunk_rows = 20_000
        first_rate = None
        t_load = time.perf_counter()
        for start in range(0, rows, chunk_rows):
            docs = corpus.docs(min(chunk_rows, rows - start), names, start=start)
            vectors = embed_all(embedder, docs)
            rate = write_batches(index, docs, vectors, 2000)
            first_rate = first_rate or rate
        load_s = time.perf_counter() - t_load
        table.append((f"Postgres upsert_many, 2k-row batches (GIN maintained, no HNSW), first {chunk_rows:,}",
                      f"{first_rate:,.0f} rows/s", ""))
        t_hnsw = time.perf_counter()
        if build_hnsw:
            with backend.connection() as conn:
                conn.execute("SET maintenance_work_mem = '2GB'")
                conn.execute("CREATE INDEX ON bench.docs USING hnsw (emb_local vector_cosine_ops)")
        hnsw_s = time.perf_counter() - t_hnsw
        with backend.connection() as conn:  # pooled connections are in autocommit
            conn.execute("VACUUM ANALYZE bench.docs")  # the steady state autovacuum keeps
        queries = corpus.queries(n_queries)
        rng = np.random.default_rng(0)
        targets = [names[int(i)] for i in rng.integers(0, partitions, n_queries)]
        index.search("warm up", partition=targets[0])
        samples = []
        for q, part in zip(queries, targets):
            t0 = time.perf_counter()
            index.search(q, k=10, partition=part)
            samples.append((time.perf_counter() - t0) * 1000)
        hnsw_note = f", HNSW built in {hnsw_s:.0f} s" if build_hnsw else ", no HNSW index"
        table.append((f"Server scoped query, {rows:,} rows / {partitions:,} partitions "
                      f"(load {load_s:.0f} s{hnsw_note}, shared_buffers {shared_buffers})", f"p50 {pct(samples, 50):.2f} ms",
                      f"p95 {pct(samples, 95):.2f} ms"))
        backend.close()
    finally:
        if server is not None:
            server.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device-rows", default="10000,50000")
    ap.add_argument("--server-rows", type=int, default=200_000)
    ap.add_argument("--partitions", type=int, default=200)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dsn", default=None)
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--no-hnsw", action="store_true", help="skip building the HNSW index after the load")
    ap.add_argument("--shared-buffers", default="2GB", help="for the embedded server (default 2GB)")
    args = ap.parse_args()
    table: list[tuple] = []
    for rows in (int(r) for r in args.device_rows.split(",") if r):
        bench_device(rows, args.queries, table)
    if not args.skip_server:
        bench_server(args.server_rows, args.partitions, args.queries, args.dsn, table,
                     build_hnsw=not args.no_hnsw, shared_buffers=args.shared_buffers)
    print(f"\nslipstream index benchmark — {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {args.queries} queries, k=10\n")
    width = max(len(r[0]) for r in table)
    print(f"| {'what'.ljust(width)} | result | |")
    print(f"|{'-' * (width + 2)}|---|---|")
    for what, a, b in table:
        print(f"| {what.ljust(width)} | {a} | {b} |")


if __name__ == "__main__":
    main()
