"""Index benchmarks: device query latency, server scoped query latency, batch upsert throughput.

    python bench/bench_index.py                      # defaults below
    python bench/bench_index.py --device-rows 10000 --server-rows 200000 --milestones 100000
    python bench/bench_index.py --skip-server --skip-growth          # the device only
    python bench/bench_index.py --skip-server --skip-growth --device-rows 10000,50000 \
        --device-baseline ../main --device-rounds 5      # the device against another checkout

Prints tables. Device: p50/p95 and CPU per shard size, memory per 10k rows. Server:
a 1,000-row partition's scoped query at each total size (flat against total rows),
uncached and through the scope cache (hits, misses, the validity check, identical
results), then the alternatives at the largest size (a packed per-partition block,
CLUSTER with --cluster), the cache's memory, the load rate; and p50/p95 against rows
in scope (1k, 5k, 20k exact, 50k HNSW). The server parts start an embedded Postgres
unless --dsn is given, and stop it. Each query phase stops after --phase-limit seconds.
Embedding uses HashingEmbedder(384) on the device; vectors are computed outside the timings.

With --device-baseline DIR, each device shard is also searched by the `index` package of
the checkout DIR, imported beside this one: --device-rounds rounds, the two sides in
alternating order on the same shard file, each side opened afresh every round and run as
above (load, 20 queries to warm, the timed queries); every result of the two sides is
compared (keys, ranks, scores, what the rows show), and the table gives each side's p50
and p95 (median over rounds) and their ratio, with the load average at both ends.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import signal
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from corpus import Corpus
from slipstream.index import HashingEmbedder, SearchIndex, SQLiteBackend

DIM = 384
BLOCK_ROWS = 100_000


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


def time_queries(index: SearchIndex, queries: list[str], *, deadline: float | None = None,
                 results: list | None = None, **kw) -> tuple[list[float], list[float]]:
    """(wall ms, CPU ms of this thread) per query: on a shared machine the gap is time
    spent waiting for a core. Stops after `deadline` (a perf_counter time), if given;
    appends each query's results to `results`, if given."""
    wall, cpu = [], []
    for q in queries:
        t0, c0 = time.perf_counter(), time.thread_time()
        found = index.search(q, k=10, **kw)
        cpu.append((time.thread_time() - c0) * 1000)
        wall.append((time.perf_counter() - t0) * 1000)
        if results is not None:
            results.append(found)
        if deadline is not None and t0 > deadline:
            print(f"phase limit reached: stopped after {len(wall)} of {len(queries)} queries",
                  file=sys.stderr)
            break
    return wall, cpu


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_index_package(checkout: str, name: str = "baseline_index"):
    """The `index` package (`slipstream.index`) of another checkout, imported as `name`
    beside this one (its imports are relative, so it runs on its own modules)."""
    root = os.path.join(os.path.abspath(checkout), "index")
    if not os.path.isfile(os.path.join(root, "__init__.py")):
        raise SystemExit(f"--device-baseline: no index package at {root}")
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def shown(results) -> list[tuple]:
    """Everything a result shows, as plain values (the two sides' classes differ)."""
    return [(r.key, r.partition, r.title, r.payload, r.attrs, r.score, r.match_type, r.lexical_rank,
             r.semantic_rank, r.lexical_score, r.semantic_score, r.matched_node_kinds) for r in results]


def device_ab(path: str, queries: list[str], baseline, rounds: int, limit_s: float) -> dict:
    """This code and `baseline` (an index package) on the shard at `path`, alternately."""
    import slipstream.index as this

    sides = {"baseline": baseline, "this": this}
    wall: dict[str, list[list[float]]] = {"baseline": [], "this": []}
    same = compared = 0
    load_start = os.getloadavg()
    t_end = time.perf_counter() + limit_s
    for r in range(rounds):
        found: dict[str, list] = {}
        for side in (("baseline", "this") if r % 2 == 0 else ("this", "baseline")):
            pkg = sides[side]
            index = pkg.SearchIndex(pkg.SQLiteBackend(path, spaces={"local": DIM}), pkg.HashingEmbedder(DIM))
            index.search("warm up", k=10)
            time_queries(index, queries[:20])
            found[side] = []
            samples, _ = time_queries(index, queries, deadline=t_end, results=found[side])
            wall[side].append(samples)
            index.backend.close()
        for a, b in zip(found["baseline"], found["this"]):
            compared += 1
            same += shown(a) == shown(b)
        if time.perf_counter() > t_end:
            break
    return {"wall": wall, "same": same, "compared": compared, "load": (load_start, os.getloadavg())}


def bench_device(rows: int, n_queries: int, table: list[tuple], growth: list[tuple],
                 baseline=None, rounds: int = 5, limit_s: float = 120.0, ab: list | None = None) -> None:
    corpus = Corpus(seed=rows)
    embedder = HashingEmbedder(DIM)
    docs = corpus.docs(rows, ["user-1"])
    vectors = embed_all(embedder, docs)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "shard.db")
        writer = SearchIndex(SQLiteBackend(path, spaces={"local": DIM}), embedder)
        rate = write_batches(writer, docs, vectors, 1000)
        writer.backend.close()
        table.append((f"SQLite upsert_many, 1k-row batches, {rows:,} rows", f"{rate:,.0f} rows/s", ""))
        before = rss_bytes()
        index = SearchIndex(SQLiteBackend(path, spaces={"local": DIM}), embedder)
        t0 = time.perf_counter()
        index.search("warm up", k=10)  # loads the shard's in-memory structures once
        load_s = time.perf_counter() - t0
        held = rss_bytes() - before
        arrays = index.backend.cache().nbytes
        queries = corpus.queries(n_queries)
        time_queries(index, queries[:20])
        wall, cpu = time_queries(index, queries, deadline=time.perf_counter() + limit_s)
        index.backend.close()
        if baseline is not None and ab is not None:
            ab.append((rows, device_ab(path, queries, baseline, rounds, limit_s)))
    table.append((f"Device query, SQLite shard {rows:,} rows, {DIM}-d (CPU p50 {pct(cpu, 50):.2f} ms)",
                  f"p50 {pct(wall, 50):.2f} ms", f"p95 {pct(wall, 95):.2f} ms"))
    growth.append(("device", rows, pct(wall, 50), pct(wall, 95), pct(cpu, 50),
                   (f"cache load {load_s:.1f} s; memory per 10k rows: {held / rows * 1e4 / 2**20:.1f} MiB "
                   f"process, {arrays / rows * 1e4 / 2**20:.1f} MiB in arrays")))


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


def cached_phase(cached: SearchIndex, plain: SearchIndex, queries: list[str], targets: list[str],
                 n_scopes: int, limit_s: float) -> dict:
    """The scope cache on `n_scopes` partitions: the first query of each (a miss: answered
    uncached while the entry is built beside it), then `queries` over the same partitions
    (hits); then the same queries compared with the uncached answers; the time to build an
    entry, on other partitions; and the validity check alone."""
    from slipstream.shardsync.changelog import ChangeLog

    backend = cached.backend
    cache = backend.scope_cache
    distinct = list(dict.fromkeys(targets))
    scopes = distinct[:n_scopes]
    cold, warm, build, same = [], [], [], 0
    t_end = time.perf_counter() + limit_s
    for scope in scopes:
        t0 = time.perf_counter()
        cached.search(queries[0], k=10, partition=scope)
        cold.append((time.perf_counter() - t0) * 1000)
    cache.wait_built()
    for _ in range(4):  # at most 16 builds wait at a time: ask again for the ones dropped
        missing = [scope for scope in scopes if not cache.holds((scope,))]
        if not missing:
            break
        for scope in missing:
            cached.search(queries[0], k=10, partition=scope)
        cache.wait_built()
    hits0 = cache.stats.hits
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        cached.search(q, k=10, partition=scopes[i % len(scopes)])
        warm.append((time.perf_counter() - t0) * 1000)
        if time.perf_counter() > t_end:
            break
    hits = cache.stats.hits - hits0
    for i, q in enumerate(queries[:len(warm)]):
        scope = scopes[i % len(scopes)]
        same += summary(cached.search(q, k=10, partition=scope)) == summary(
            plain.search(q, k=10, partition=scope))
    for scope in distinct[n_scopes:n_scopes + 10]:
        t0 = time.perf_counter()
        backend._build_pooled(cache, (scope,))
        build.append((time.perf_counter() - t0) * 1000)
    log = ChangeLog(backend.schema)
    check = []
    with backend.connection() as conn:
        for i in range(200):
            t0 = time.perf_counter()
            log.partition_versions(conn, [scopes[i % len(scopes)]])
            check.append((time.perf_counter() - t0) * 1000)
    return {"cold": cold, "warm": warm, "same": same, "n": len(warm), "check": check, "build": build,
            "hits": hits, "entries": len(cache), "bytes": cache.nbytes}


def summary(results) -> list[tuple]:
    return [(r.key, r.score, r.lexical_rank, r.semantic_rank, r.lexical_score, r.semantic_score,
             r.matched_node_kinds, r.title, r.payload) for r in results]


def packed_phase(backend, scopes: list[str], limit_s: float) -> dict:
    """The packed per-partition block, measured from its read side: one row per partition
    holding its keys, lengths, term counts and vectors (as a writer would keep it), read
    and decoded per query; and, on top, building the in-memory structures to rank from."""
    from psycopg import sql
    from slipstream.index.shard_cache import ShardCache

    s = sql.Identifier(backend.schema)
    with backend.connection() as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {s}.blocks").format(s=s))
        conn.execute(sql.SQL(
            "CREATE TABLE {s}.blocks (partition text PRIMARY KEY, ids bigint[], object_ids text[], "
            "lt int4[], lb int4[], tfs jsonb, vecs bytea)").format(s=s))
        conn.execute(sql.SQL("ALTER TABLE {s}.blocks ALTER COLUMN vecs SET STORAGE EXTERNAL").format(s=s))
        conn.execute(sql.SQL(
            "INSERT INTO {s}.blocks SELECT partition, array_agg(id ORDER BY id), "
            "array_agg(object_id ORDER BY id), array_agg(len_title ORDER BY id), "
            "array_agg(len_body ORDER BY id), jsonb_agg(tf ORDER BY id), "
            "string_agg(vector_send(emb_local), ''::bytea ORDER BY id) FROM {s}.docs "
            "WHERE partition = ANY(%s) AND NOT deleted GROUP BY partition").format(s=s), (scopes,))
        conn.execute(sql.SQL("VACUUM ANALYZE {s}.blocks").format(s=s))
    read, build = [], []
    t_end = time.perf_counter() + limit_s
    dim = backend.spaces["local"]
    with backend.connection() as conn:
        for i in range(200):
            t0 = time.perf_counter()
            ids, oids, lt, lb, tfs, vecs = conn.execute(sql.SQL(
                "SELECT ids, object_ids, lt, lb, tfs, vecs FROM {s}.blocks WHERE partition = %s").format(s=s),
                (scopes[i % len(scopes)],)).fetchone()
            matrix = np.frombuffer(vecs, ">f4").reshape(len(ids), dim + 1)[:, 1:].astype(np.float32)
            t1 = time.perf_counter()
            ShardCache.of_rows({"local": dim}, ((d, ("note", o, "leaf"), "p", a, b, tf, {"local": v})
                                                for d, o, a, b, tf, v in zip(ids, oids, lt, lb, tfs, matrix)))
            t2 = time.perf_counter()
            read.append((t1 - t0) * 1000)
            build.append((t2 - t0) * 1000)
            if t2 > t_end:
                break
    return {"read": read, "build": build}


def bench_server(rows: int, partition_rows: int, n_queries: int, dsn: str | None, table: list[tuple],
                 shared_buffers: str, milestones: list[int], cluster: bool, limit_s: float,
                 cache_mb: int, flat: list[tuple]) -> None:
    """Scoped queries on one partition of `partition_rows` rows as the table grows.

    Each block of BLOCK_ROWS loaded rows holds BLOCK_ROWS / partition_rows partitions,
    their rows interleaved (row i of a block goes to partition i mod count), so at each
    milestone every partition is full and a partition's rows lie on as many heap pages
    as it has rows, as rows arriving from many tenants do."""
    from bulkload import BulkCorpus, UnigramEmbedder, bulk_load, log_loaded, rebuild_gin
    from slipstream.index import PostgresBackend
    from slipstream.index.scope_cache import ScopeCache
    from slipstream.shardsync.changelog import ChangeLog
    from slipstream.worker.localpg import EmbeddedPostgres

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
        per_block = BLOCK_ROWS // partition_rows
        names = [f"tenant-{i}" for i in range(rows // partition_rows)]
        queries = Corpus(seed=7).queries(n_queries)
        cached = None
        if cache_mb:
            cached = SearchIndex(PostgresBackend(
                dsn, schema="bench", spaces={"local": DIM}, hnsw=False, create_schema=False,
                scope_cache=ScopeCache(ChangeLog("bench"), max_bytes=cache_mb * 2**20)), UnigramEmbedder(DIM))
        logged_id, log_s = 0, 0.0
        loaded, load_s, steps = 0, 0.0, sorted({m for m in milestones if m < rows} | {rows})
        for step in steps:
            n, secs = 0, 0.0
            for block in range(loaded // BLOCK_ROWS, step // BLOCK_ROWS):
                part = names[block * per_block:(block + 1) * per_block]
                got, t = bulk_load(backend, corpus, BLOCK_ROWS, part, start=block * BLOCK_ROWS,
                                   deadline=limit_s * 6, gin=False)
                n, secs = n + got, secs + t
            loaded, load_s = loaded + n, load_s + secs
            rng = np.random.default_rng(0)
            full = loaded // partition_rows
            targets = [names[int(i)] for i in rng.integers(0, full, n_queries)]
            t0 = time.perf_counter()
            rebuild_gin(backend)
            load_s += time.perf_counter() - t0
            with backend.connection() as conn:
                conn.execute("VACUUM ANALYZE bench.docs")  # the steady state autovacuum keeps
                size = conn.execute("SELECT pg_total_relation_size('bench.docs')").fetchone()[0]
            samples = scoped_samples(index, queries, targets, limit_s)
            table.append(((f"Server scoped query (1 partition, {partition_rows:,} rows), "
                          f"{loaded:,} rows / {full:,} partitions, rows interleaved; "
                          f"table + indexes {size / 2**30:.1f} GiB"),
                          f"p50 {pct(samples, 50):.2f} ms", f"p95 {pct(samples, 95):.2f} ms"))
            flat.append(("uncached", loaded, full, pct(samples, 50), pct(samples, 95), ""))
            if cached is not None:
                t0 = time.perf_counter()
                logged_id = log_loaded(backend, logged_id)
                log_s += time.perf_counter() - t0
                got = cached_phase(cached, index, queries, targets, 50, limit_s)
                flat.append(("scope cache, hit", loaded, full, pct(got["warm"], 50), pct(got["warm"], 95),
                             f"{got['same']}/{got['n']} identical to uncached; {got['hits']} hits"))
                flat.append(("scope cache, miss (first query of a partition: uncached)", loaded, full,
                             pct(got["cold"], 50), pct(got["cold"], 95), ""))
                flat.append(("validity check alone (one indexed query)", loaded, full,
                             pct(got["check"], 50), pct(got["check"], 95), ""))
                last_cached = got
            if loaded < step:
                break
        table.append((f"Server bulk load (binary COPY, vectors in bulk, GIN built after), {loaded:,} rows",
                      f"{loaded / load_s:,.0f} rows/s", f"{load_s:.0f} s"))
        if cached is not None:
            got = last_cached
            table.append(((f"Server scoped query, scope cache hit ({got['same']}/{got['n']} results identical "
                           f"to uncached), {loaded:,} rows"), f"p50 {pct(got['warm'], 50):.2f} ms",
                          f"p95 {pct(got['warm'], 95):.2f} ms"))
            table.append(("Server scoped query, scope cache miss (answered uncached, entry built beside it)",
                          f"p50 {pct(got['cold'], 50):.2f} ms", f"p95 {pct(got['cold'], 95):.2f} ms"))
            if got["build"]:
                table.append(("Server scope cache: building one partition's entry (builder thread)",
                              f"p50 {pct(got['build'], 50):.2f} ms", f"p95 {pct(got['build'], 95):.2f} ms"))
            table.append(((f"Server scope cache memory: {got['entries']} partitions of {partition_rows:,} rows "
                           f"held in {got['bytes'] / 2**20:.1f} MiB (budget {cache_mb} MiB)"),
                          f"{got['bytes'] / max(1, got['entries']) / 2**20:.2f} MiB per partition", ""))
            table.append((f"Change-log entries for the loaded rows (as the worker writes them), {loaded:,}",
                          f"{log_s:.0f} s", ""))
            packed = packed_phase(backend, list(dict.fromkeys(targets))[:50], limit_s)
            table.append(("Packed per-partition block (one row per partition): read + decode only",
                          f"p50 {pct(packed['read'], 50):.2f} ms", f"p95 {pct(packed['read'], 95):.2f} ms"))
            table.append(("Packed per-partition block: read + decode + build the structures to rank",
                          f"p50 {pct(packed['build'], 50):.2f} ms", f"p95 {pct(packed['build'], 95):.2f} ms"))
            cached.backend.close()
        if cluster:
            t0 = time.perf_counter()
            with backend.connection() as conn:
                conn.execute("SET maintenance_work_mem = '1GB'")
                conn.execute("CREATE INDEX IF NOT EXISTS docs_partition_order ON bench.docs (partition)")
                conn.execute("CLUSTER bench.docs USING docs_partition_order")
                conn.execute("VACUUM ANALYZE bench.docs")
            cluster_s = time.perf_counter() - t0
            samples = scoped_samples(index, queries, targets, limit_s)
            table.append(((f"Server scoped query, {loaded:,} rows, after CLUSTER by partition "
                          f"({cluster_s:.0f} s)"), f"p50 {pct(samples, 50):.2f} ms",
                          f"p95 {pct(samples, 95):.2f} ms"))
        backend.close()
    finally:
        if server is not None:
            server.cleanup()


def bench_growth(n_queries: int, dsn: str | None, growth: list[tuple], shared_buffers: str,
                 limit_s: float, cache_mb: int) -> None:
    """Server p50/p95 against rows in scope: partitions of 1k, 5k and 20k rows (exact) and
    50k rows (above the exact-scan limit: HNSW), in one 76k-row table."""
    from bulkload import BulkCorpus, UnigramEmbedder, bulk_load, log_loaded
    from slipstream.index import PostgresBackend
    from slipstream.index.scope_cache import ScopeCache
    from slipstream.shardsync.changelog import ChangeLog
    from slipstream.worker.localpg import EmbeddedPostgres

    sizes = {"g1k": 1, "g5k": 5, "g20k": 20, "g50k": 50}
    cycle = [name for name, share in sizes.items() for _ in range(share)]
    server = None
    if dsn is None:
        server = EmbeddedPostgres(durable=False, settings={
            "maintenance_work_mem": "1GB", "shared_buffers": shared_buffers}).start()
        dsn = server.dsn()
    try:
        backend = PostgresBackend(dsn, schema="growth", spaces={"local": DIM}, hnsw=False)
        with backend.connection() as conn:  # a server used before: start empty
            conn.execute("DROP TABLE IF EXISTS growth.ann_local")
            conn.execute("TRUNCATE growth.docs, growth.ann_queue")
        loaded, _ = bulk_load(backend, BulkCorpus(DIM, seed=11), 1000 * len(cycle), cycle)
        with backend.connection() as conn:
            conn.execute("TRUNCATE growth.ann_queue")
        t0 = time.perf_counter()
        backend.close()  # with HNSW: the side table is built from the loaded rows
        backend = PostgresBackend(dsn, schema="growth", spaces={"local": DIM})
        with backend.connection() as conn:
            conn.execute("VACUUM ANALYZE growth.docs")
            conn.execute("VACUUM ANALYZE growth.ann_local")
        hnsw_s = time.perf_counter() - t0
        index = SearchIndex(backend, UnigramEmbedder(DIM))
        queries = Corpus(seed=11).queries(n_queries)
        log_loaded(backend)
        cache = ScopeCache(ChangeLog("growth"), max_bytes=cache_mb * 2**20) if cache_mb else None
        cached = SearchIndex(PostgresBackend(dsn, schema="growth", spaces={"local": DIM},
                                             create_schema=False, scope_cache=cache), UnigramEmbedder(DIM))
        for name, share in sizes.items():
            samples = scoped_samples(index, queries, [name] * len(queries), limit_s)
            approx = index.search(queries[0], k=10, partition=name).approximate
            growth.append(("server", 1000 * share, pct(samples, 50), pct(samples, 95), None,
                           ("HNSW" if approx else "exact") + f"; {loaded:,} rows in the table"
                           + (f", HNSW built in {hnsw_s:.0f} s" if approx else "")))
            if cache is not None:
                before = cache.stats.hits
                samples = scoped_samples(cached, queries, [name] * len(queries), limit_s)
                hit = cache.stats.hits > before
                growth.append(("server, scope cache", 1000 * share, pct(samples, 50), pct(samples, 95), None,
                               "cache hits" if hit else "not cacheable (above exact_limit): as uncached"))
        cached.backend.close()
        backend.close()
    finally:
        if server is not None:
            server.cleanup()


def main() -> None:
    # A SIGTERM (a timeout, an impatient operator) still stops the embedded server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device-rows", default="1000,5000,10000,20000,50000")
    ap.add_argument("--server-rows", type=int, default=1_000_000)
    ap.add_argument("--partition-rows", type=int, default=1000)
    ap.add_argument("--milestones", default="100000,300000",
                    help="also measure the fixed-size scoped query at these total sizes")
    ap.add_argument("--cluster", action="store_true", help="then CLUSTER the table by partition and measure again")
    ap.add_argument("--phase-limit", type=float, default=120.0, help="seconds per query phase")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dsn", default=None)
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--skip-growth", action="store_true", help="skip the server rows-in-scope table")
    ap.add_argument("--shared-buffers", default="6GB", help="for the embedded server (default 6GB)")
    ap.add_argument("--cache-mb", type=int, default=512,
                    help="the server's scope cache budget in MiB (0: measure without it)")
    ap.add_argument("--device-baseline", metavar="DIR", default=None,
                    help="also run the device queries with the index package of the checkout DIR")
    ap.add_argument("--device-rounds", type=int, default=5,
                    help="rounds of the device comparison, sides alternating (default 5)")
    args = ap.parse_args()
    table: list[tuple] = []
    growth: list[tuple] = []
    flat: list[tuple] = []
    ab: list[tuple] = []
    baseline = load_index_package(args.device_baseline) if args.device_baseline else None
    for rows in (int(r) for r in args.device_rows.split(",") if r):
        bench_device(rows, args.queries, table, growth, baseline, max(1, args.device_rounds),
                     args.phase_limit, ab)
    if not args.skip_growth:
        bench_growth(args.queries, args.dsn, growth, args.shared_buffers, args.phase_limit, args.cache_mb)
    if not args.skip_server:
        bench_server(args.server_rows, args.partition_rows, args.queries, args.dsn, table,
                     shared_buffers=args.shared_buffers,
                     milestones=[int(m) for m in args.milestones.split(",") if m],
                     cluster=args.cluster, limit_s=args.phase_limit, cache_mb=args.cache_mb, flat=flat)
    print(f"\nslipstream index benchmark — {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {args.queries} queries, k=10\n")
    width = max((len(r[0]) for r in table), default=4)
    print(f"| {'what'.ljust(width)} | result | |")
    print(f"|{'-' * (width + 2)}|---|---|")
    for what, a, b in table:
        print(f"| {what.ljust(width)} | {a} | {b} |")
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if flat:
        print("\n| server scoped query, 1 partition | total rows | partitions | p50 ms | p95 ms | notes |"
              "\n|---|---|---|---|---|---|")
        for what, rows, parts, p50, p95, note in flat:
            print(f"| {what} | {rows:,} | {parts:,} | {p50:.2f} | {p95:.2f} | {note} |")
    if ab:
        print(f"\n| device, this code against {args.device_baseline} | rounds | baseline p50 / p95 ms "
              "| this p50 / p95 ms | p50 ratio (median of rounds) | identical results | load average |"
              "\n|---|---|---|---|---|---|---|")
        for rows, got in ab:
            w = got["wall"]
            p50 = {side: [pct(x, 50) for x in w[side]] for side in w}
            p95 = {side: float(np.median([pct(x, 95) for x in w[side]])) for side in w}
            ratio = float(np.median([t / b for t, b in zip(p50["this"], p50["baseline"])]))
            start, end = got["load"]
            print(f"| {rows:,} rows | {len(w['this'])} | {np.median(p50['baseline']):.2f} / "
                  f"{p95['baseline']:.2f} | {np.median(p50['this']):.2f} / {p95['this']:.2f} | x{ratio:.2f} "
                  f"(rounds: {' '.join(f'{t / b:.2f}' for t, b in zip(p50['this'], p50['baseline']))}) | "
                  f"{got['same']}/{got['compared']} | {start[0]:.1f} -> {end[0]:.1f} |")
    if growth:
        print("\n| side | rows in scope | p50 ms | p95 ms | CPU p50 ms | notes |\n|---|---|---|---|---|---|")
        for side, rows, p50, p95, cpu, note in growth:
            cpu_text = f"{cpu:.2f}" if cpu is not None else ""
            print(f"| {side} | {rows:,} | {p50:.2f} | {p95:.2f} | {cpu_text} | {note} |")


if __name__ == "__main__":
    main()
