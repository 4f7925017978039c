"""HNSW on this server: what one insert into a live index costs against building the
index in one go, and the recall each setting buys; the figures behind keeping the
HNSW index off the worker's write path (`index/pg_ann.py`).

    python bench/bench_hnsw.py                        # 20,000 rows, pgvector's defaults and two cheaper settings
    python bench/bench_hnsw.py --rows 10000 --settings 16/64 8/32

For each `m/ef_construction`: a table of `--rows` 384-d `HashingEmbedder` vectors of
bench texts (a title and a 40-word body) is loaded by COPY, its HNSW index built in one
go (timed: the build's cost per row), then 300 more rows are inserted one per
transaction into the live index (timed: p50 and mean per insert), and 200 queries of
three words are answered with `hnsw.ef_search` 100, recall@10 against the exact
cosine top 10.

Every setting runs under a hard time limit; a setting that overruns is reported as
stalled and the bench exits. The embedded PostgreSQL is stopped on every exit, SIGINT
and SIGTERM included.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import threading
import time

import numpy as np
import psycopg

sys.path.insert(0, os.path.dirname(__file__))

from corpus import Corpus
from slipstream.index.embedding import HashingEmbedder
from slipstream.worker.localpg import EmbeddedPostgres

DIM = 384


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the `with EmbeddedPostgres` block: Postgres stops


def _limit(name: str, seconds: float) -> threading.Timer:
    def overrun() -> None:
        print(f"\nSTALLED: '{name}' did not finish within {seconds:.0f} s; stopping the bench",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Timer(seconds, overrun)
    timer.daemon = True
    timer.start()
    return timer


def measure(conn: psycopg.Connection, m: int, ef: int, rows: int, vectors: np.ndarray,
            queries: list[np.ndarray]) -> tuple:
    table = f"hnsw_{m}_{ef}"
    conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, v vector({DIM}))")
    with conn.cursor().copy(f"COPY {table} (id, v) FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["int8", "vector"])
        for i in range(rows):
            copy.write_row((i, vectors[i]))
    started = time.perf_counter()
    conn.execute(f"CREATE INDEX ON {table} USING hnsw (v vector_cosine_ops) "
                 f"WITH (m = {m}, ef_construction = {ef})")
    build = time.perf_counter() - started
    conn.execute("CHECKPOINT")
    inserts = []
    for j in range(rows, len(vectors)):
        started = time.perf_counter()
        conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (j, vectors[j]))
        inserts.append((time.perf_counter() - started) * 1000)
    conn.execute("SET hnsw.ef_search = 100")
    found = []
    for q in queries:
        got = {r[0] for r in conn.execute(f"SELECT id FROM {table} ORDER BY v <=> %s LIMIT 10", (q,))}
        exact = set(np.argsort(-(vectors.astype(np.float64) @ q), kind="stable")[:10].tolist())
        found.append(len(got & exact) / 10)
    conn.execute(f"DROP TABLE {table}")
    return build / rows * 1000, statistics.median(inserts), statistics.mean(inserts), float(np.mean(found))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--settings", nargs="+", default=["16/64", "16/32", "8/32"],
                    help="m/ef_construction pairs (pgvector's default is 16/64)")
    ap.add_argument("--limit", type=float, default=600, help="hard limit per setting, seconds")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    from pgvector.psycopg import register_vector

    corpus = Corpus(seed=3)
    embedder = HashingEmbedder(DIM)
    vectors = embedder.embed([corpus.words(6) + "\n" + corpus.words(40) for _ in range(args.rows + 300)])
    queries = [q for q in embedder.embed([corpus.words(3) for _ in range(400)]) if np.any(q)][:200]
    table = []
    with EmbeddedPostgres(settings={"maintenance_work_mem": "512MB"}) as server, \
            psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        for setting in args.settings:
            m, ef = (int(x) for x in setting.split("/"))
            timer = _limit(setting, args.limit)
            try:
                table.append((m, ef, *measure(conn, m, ef, args.rows, vectors, queries)))
            finally:
                timer.cancel()
    print(f"\nslipstream HNSW benchmark — {platform.machine()}, {os.cpu_count()} cores, "
          f"embedded PostgreSQL 18 + pgvector, {args.rows:,} rows of {DIM}-d HashingEmbedder "
          f"vectors, load average at the end {os.getloadavg()[0]:.1f}\n")
    print("| m / ef_construction | build, per row | one insert into the live index, p50 / mean "
          "| recall@10 (ef_search 100) |")
    print("|---|---|---|---|")
    for m, ef, build, p50, mean, recall in table:
        print(f"| {m} / {ef} | {build:.2f} ms | {p50:.2f} / {mean:.2f} ms | {recall:.3f} |")


if __name__ == "__main__":
    main()
