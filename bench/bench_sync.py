"""Device sync benchmarks: export, delta pages, live commit-to-device latency, idle long-polls.

    python bench/bench_sync.py                    # everything, default sizes
    python bench/bench_sync.py --export-rows 10000 50000 --latency-seconds 10 --devices 1000

* Export: `export_shard` of a 10k and a 50k-row partition (384-d vectors), rows/s and
  file size (the median of ``--export-rounds`` runs); and the same partition downloaded
  over HTTP from `/v1/snapshot` as devices would ask for it: a first request (an
  export), a second (the serve process's cached file, nothing new), one after 500 rows
  changed (the cached file brought forward by those changes) and one with gzip. With
  ``--export-baseline REF`` the export of git revision REF runs in the same rounds,
  alternating with this one, so the ratio between them holds however loaded the machine
  is.
* Delta: 2,000 updates pulled as pages over HTTP: bytes on the wire per change (gzip
  JSON) against the raw row (title + body + keywords + payload + attrs + float32
  vector), and changes/s applied on the device (decode + `apply_page`).
* Live: an app commits single-row transactions at a fixed rate into the source table;
  the real worker applies them and NOTIFYs; a device follows with long-polls. For
  each row, app commit -> row applied in the device shard (searchable), p50/p99.
* Devices: N concurrent idle long-polls held by one server process, its RSS before
  and while holding them, and how long one change takes to answer all of them.

Each phase has a hard time limit (SIGALRM); the embedded Postgres and every server
process are stopped at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psycopg

sys.path.insert(0, os.path.dirname(__file__))

from corpus import Corpus
from pgdb import make_db
from report import print_table
from slipstream.index import HashingEmbedder, PostgresBackend, SearchIndex
from slipstream.shardsync.changelog import ChangeEntry, ChangeLog
from slipstream.shardsync.client import SyncClient
from slipstream.shardsync.export import export_shard
from slipstream.shardsync.shard import apply_page, open_shard
from slipstream.shardsync.tokens import issue_token
from slipstream.shardsync.wire import decode_page, encode_page
from slipstream.worker.localpg import EmbeddedPostgres

SECRET = "bench-sync-secret-" + "b" * 32
DIM = 384


class PhaseTimeout(Exception):
    pass


@contextlib.contextmanager
def limit(seconds: int, name: str):
    def fire(signum, frame):
        raise PhaseTimeout(f"{name}: over its {seconds} s limit")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def load(dsn: str, rows: int, partition: str, index: SearchIndex, log: ChangeLog,
         corpus: Corpus, start: int) -> None:
    """Write `rows` docs and their log entries, in transactions of 2,000, as the worker does."""
    rng = np.random.default_rng(start)
    with index.backend.connect() as conn:
        for lo in range(start, start + rows, 2000):
            write_docs(conn, index, log, corpus.docs(min(2000, start + rows - lo), [partition],
                                                     start=lo), rng)


def write_docs(conn: psycopg.Connection, index: SearchIndex, log: ChangeLog, docs: list,
               rng: np.random.Generator, lsn: int = 1) -> None:
    """Upsert `docs` and log a `u` for each, in one transaction. Vectors are dense random
    unit vectors (as a real embedding model gives; hashed features would be sparse and
    compress unrealistically well)."""
    vecs = rng.standard_normal((len(docs), DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    prepared = index.prepare(docs, {i: {"local": v} for i, v in enumerate(vecs)})
    with conn.transaction():
        index.backend.write(prepared, conn=conn)
        log.append(conn, [ChangeEntry(d.partition, *d.key, "u", lsn) for d in docs])


def replicate(dsn: str, log: ChangeLog, src: str, dst: str, rows: int) -> None:
    """`rows` rows in `dst`: copies of `src`'s rows (new ids), made inside Postgres, with
    their log entries; far faster than analysing and embedding them again."""
    with psycopg.connect(dsn) as conn:
        cols = [c for (c,) in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = "
            "'slipstream' AND table_name = 'docs' AND column_name NOT IN "
            "('id', 'object_id', 'partition') ORDER BY ordinal_position")]
        (n,) = conn.execute("SELECT count(*) FROM slipstream.docs WHERE partition = %s",
                            (src,)).fetchone()
        names = ", ".join(cols)
        keys = conn.execute(
            f"INSERT INTO slipstream.docs (object_id, partition, {names}) "
            f"SELECT d.object_id || '-' || k, %s, {', '.join('d.' + c for c in cols)} "
            "FROM slipstream.docs d, generate_series(0, %s) k WHERE d.partition = %s "
            "ORDER BY k, d.id LIMIT %s RETURNING object_type, object_id, node_kind",
            (dst, rows // max(n, 1), src, rows)).fetchall()
        log.append(conn, [ChangeEntry(dst, *key, "u", 1) for key in keys])
        conn.commit()


class Serve:
    """`slipstream serve` as a separate process (so its memory can be measured)."""

    def __init__(self, dsn: str, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = workdir / "serve.toml"
        cfg.write_text(f'[source]\ndsn = "{dsn}"\n[sync]\nport = {self.port}\nmetrics_port = 0\n'
                       'token_secret_env = "BENCH_SYNC_SECRET"\n')
        self.log = open(workdir / "serve.log", "w")  # noqa: SIM115
        exe = Path(sys.executable).with_name("slipstream")
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--config", str(cfg), "--log-level", "warning"],
            env={**os.environ, "BENCH_SYNC_SECRET": SECRET, "TMPDIR": str(workdir)},
            stdout=self.log,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError((workdir / "serve.log").read_text())
            time.sleep(0.1)
        raise RuntimeError("serve did not start")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def baseline_export(ref: str):
    """`export_shard` as it was at git revision `ref`, imported beside the current one."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "-C", str(root), "show", f"{ref}:shardsync/export.py"],
                            check=True, capture_output=True, text=True).stdout
    name = "slipstream.shardsync._export_baseline"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "slipstream.shardsync"  # its relative imports resolve as in the tree
    exec(compile(source, f"{ref}:shardsync/export.py", "exec"), module.__dict__)  # noqa: S102
    return module.export_shard


def export_phase(dsn: str, sizes: list[int], serve: Serve, workdir: Path, table: list,
                 rounds: int = 1, baseline: str | None = None) -> None:
    runs = [("export_shard", export_shard)]
    if baseline:
        runs.append((f"export_shard at {baseline}", baseline_export(baseline)))
    for n in sizes:
        path = workdir / f"export-{n}.db"
        times: dict[str, list[float]] = {name: [] for name, _ in runs}
        cpu: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in runs}
        loads = []
        for r in range(rounds):
            for name, run in runs if r % 2 == 0 else runs[::-1]:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    backend = conn.info.backend_pid  # the embedded server runs on this machine
                    pg0, py0 = process_cpu(backend), time.process_time()
                    started = time.perf_counter()
                    run(conn, "slipstream", [f"p{n}"], path, ["local"])
                    times[name].append(time.perf_counter() - started)
                    cpu[name].append((time.process_time() - py0, process_cpu(backend) - pg0))
                loads.append(os.getloadavg()[0])
        size = path.stat().st_size
        load = f"load {min(loads):.1f}-{max(loads):.1f}"
        median = {name: float(np.median(ts)) for name, ts in times.items()}
        for name, _ in runs:
            t = median[name]
            py, pg = (float(np.median(c)) for c in zip(*cpu[name]))
            table.append((f"Export {n:,} rows (384-d) with {name}", f"{n / t:,.0f} rows/s",
                          (f"median {t:.2f} s of {rounds} (best {min(times[name]):.2f} s), "
                           f"{size / 1e6:.1f} MB; CPU {py:.2f} s Python + {pg:.2f} s Postgres"),
                          load))
        if baseline:
            table.append((f"Export {n:,} rows: current / {baseline}",
                          f"{median[runs[1][0]] / median['export_shard']:.2f}x rows/s",
                          "medians of rounds run alternately", load))
        snapshot_requests(dsn, n, serve, workdir, table)


EDITS = 500  # rows rewritten between two snapshot requests of one partition


def snapshot_requests(dsn: str, n: int, serve: Serve, workdir: Path, table: list) -> None:
    """`GET /v1/snapshot` of partition p{n}, as devices would ask: the first request
    exports; the next finds the serve process's cached file with nothing new; after
    `EDITS` rows are rewritten (new text, analysed and embedded), one more brings the cached
    file forward by those changes (or exports afresh, when they are more than 5% of the
    partition's rows: the detail says which); the last asks for gzip."""
    part = f"p{n}"
    headers = {"authorization": f"Bearer {issue_token(SECRET, [part])}"}

    def edit() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            keys = conn.execute("SELECT object_type, object_id, node_kind FROM slipstream.docs "
                                "WHERE partition = %s ORDER BY random() LIMIT %s",
                                (part, EDITS)).fetchall()
        backend = PostgresBackend(dsn, spaces={"local": DIM}, hnsw=False, create_schema=False)
        try:
            docs = [dataclasses.replace(d, object_type=k[0], object_id=k[1], node_kind=k[2])
                    for d, k in zip(Corpus(seed=n).docs(len(keys), [part]), keys)]
            with backend.connect() as conn:
                write_docs(conn, SearchIndex(backend, HashingEmbedder(DIM)), ChangeLog(), docs,
                           np.random.default_rng(n))
        finally:
            backend.close()

    steps = [("first request: export + send", "identity", None),
             ("again, nothing new: the cached file", "identity", None),
             (f"after {EDITS} rows changed (brought forward, or exported past 5% of the rows)",
              "identity", edit),
             ("again, gzip: the cached file compressed", "gzip", None)]
    for label, encoding, before in steps:
        if before is not None:
            before()
        out = workdir / f"download-{n}.db"
        with httpx.Client(headers={**headers, "accept-encoding": encoding}, timeout=300) as http:
            started = time.perf_counter()
            with http.stream("GET", f"{serve.url}/v1/snapshot", params={"spaces": "local"}) as r:
                r.raise_for_status()
                with open(out, "wb") as f:
                    f.writelines(r.iter_bytes())
                wire, source = r.num_bytes_downloaded, r.headers.get("slipstream-snapshot")
            t = time.perf_counter() - started
        table.append((f"Snapshot of {n:,} rows over HTTP, {label}", f"{n / t:,.0f} rows/s",
                      f"{t:.2f} s, {wire / 1e6:.1f} MB on the wire ({encoding}; served: {source})",
                      f"load {os.getloadavg()[0]:.1f}"))


def delta_phase(dsn: str, index: SearchIndex, log: ChangeLog, serve: Serve, workdir: Path,
                corpus: Corpus, table: list, first: int, changes: int = 2000) -> None:
    path = workdir / "delta.db"
    part = f"p{first}"
    token = issue_token(SECRET, [part])
    with SyncClient(serve.url, token, path, spaces=["local"]) as c:
        c.sync()
    docs = corpus.docs(changes, [part], start=0)  # the first partition's ids: updates
    with index.backend.connect() as conn:
        for lo in range(0, changes, 500):
            write_docs(conn, index, log, docs[lo:lo + 500], np.random.default_rng(lo), lsn=2)
    shard = open_shard(path)
    cursor = int(shard.meta("cursor"))
    wire = raw = json_bytes = entries = 0
    decode_apply = 0.0
    with httpx.Client(headers={"authorization": f"Bearer {token}"}, timeout=60) as http:
        started = time.perf_counter()
        while True:
            r = http.get(f"{serve.url}/v1/changes",
                         params={"cursor": cursor, "limit": 500, "spaces": "local"})
            r.raise_for_status()
            wire += r.num_bytes_downloaded
            t0 = time.perf_counter()
            page = decode_page(r.content)
            cursor = apply_page(shard, page)
            decode_apply += time.perf_counter() - t0
            json_bytes += len(encode_page(page))
            for e in page.entries:
                raw += (len(e.title.encode()) + len(e.body.encode())
                        + sum(len(k.encode()) for k in e.keywords)
                        + len(str(e.payload)) + len(str(e.attrs)) + DIM * 4)
            entries += len(page.entries)
            if not page.has_more:
                break
        total = time.perf_counter() - started
    shard.close()
    table.append((f"Delta: {entries:,} changed rows in pages of 500, gzip JSON",
                  f"{wire / entries:,.0f} B/change on the wire",
                  f"raw row + float32 vector {raw / entries:,.0f} B; JSON {json_bytes / entries:,.0f} B",
                  f"ratio {wire / raw:.2f}"))
    table.append(("Delta apply on the device (decode + apply_page)",
                  f"{entries / decode_apply:,.0f} changes/s",
                  f"end to end over HTTP {entries / total:,.0f} changes/s", ""))


WORKER_CONFIG = """
[source]
dsn = "{dsn}"
[search]
hnsw = false
[spaces]
local = 384
[embedders.local]
kind = "hashing"
[worker]
http_port = 0
batch_max_seconds = 0.005
[tables."public.items"]
object_type = "item"
title = "{{title}}"
body = "{{body}}"
partition = "tenant-{{tenant}}"
"""


class LiveFollower:
    """A device client following the server live in a thread, noting when each object's
    row was applied to its shard (`arrived[object_id]`, wall-clock time)."""

    def __init__(self, client: SyncClient) -> None:
        import slipstream.shardsync.client as client_mod

        self.client, self.arrived = client, {}
        self._module, self._real_apply = client_mod, client_mod.apply_page

        def timed_apply(shard, page):
            cursor = self._real_apply(shard, page)
            now = time.time()
            for e in page.entries:
                self.arrived.setdefault(e.key[1], now)
            return cursor

        client_mod.apply_page = timed_apply
        self.thread = threading.Thread(target=client.sync, kwargs={"live": True, "wait": 10},
                                       daemon=True)

    def wait_for(self, committed: dict[str, float], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while set(committed) - set(self.arrived) and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.client.stop()
        self.thread.join(timeout=15)
        self.client.close()
        self._module.apply_page = self._real_apply

    def latencies_ms(self, committed: dict[str, float]) -> np.ndarray:
        return np.asarray([self.arrived[k] - committed[k] for k in committed
                           if k in self.arrived]) * 1000


def latency_phase(server: EmbeddedPostgres, rate: int, seconds: float, workdir: Path,
                  table: list) -> None:
    from slipstream.worker.app import Worker
    from slipstream.worker.config import load_config

    dsn = make_db(server, "bench_sync_live")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, tenant int NOT NULL, title text, "
                     "body text)")
    cfg = workdir / "worker.toml"
    cfg.write_text(WORKER_CONFIG.format(dsn=dsn))
    worker = Worker(load_config(cfg))
    worker.setup()
    worker.close()
    exe = Path(sys.executable).with_name("slipstream")  # the worker in its own process
    wlog = open(workdir / "worker.log", "w")  # noqa: SIM115
    wproc = subprocess.Popen([str(exe), "run", "--config", str(cfg), "--no-http"],
                             stdout=wlog, stderr=subprocess.STDOUT)
    try:
        serve = Serve(dsn, workdir)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the worker streams from its slot
            with psycopg.connect(dsn, autocommit=True) as conn:
                row = conn.execute("SELECT active FROM pg_replication_slots").fetchone()
            if row and row[0]:
                break
            time.sleep(0.1)
    except BaseException:
        wproc.kill()
        wproc.wait()
        wlog.close()
        raise
    committed: dict[str, float] = {}
    path = workdir / "live.db"
    follower = LiveFollower(SyncClient(serve.url, issue_token(SECRET, ["tenant-1"]), path,
                                       spaces=["local"]))
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO items VALUES (0, 1, 'warm up', 'first row')")
            follower.thread.start()
            while not path.exists():
                time.sleep(0.01)
            corpus = Corpus(seed=9)
            n = int(rate * seconds)
            started = time.perf_counter()
            for i in range(1, n + 1):
                conn.execute("INSERT INTO items VALUES (%s, 1, %s, %s)",
                             (i, corpus.words(6), corpus.words(40)))
                committed[str(i)] = time.time()
                delay = started + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
        follower.wait_for(committed)
    finally:
        follower.close()
        serve.stop()
        wproc.terminate()
        try:
            wproc.wait(15)
        except subprocess.TimeoutExpired:
            wproc.kill()
            wproc.wait()
        wlog.close()
    ms = follower.latencies_ms(committed)
    missing = len(committed) - len(ms)
    table.append((f"App commit -> applied in a live device shard, {rate} txn/s for "
                  f"{seconds:.0f} s ({len(ms)} rows{f', {missing} missing' if missing else ''})",
                  f"p50 {np.percentile(ms, 50):.1f} ms", f"p99 {np.percentile(ms, 99):.1f} ms",
                  "worker process + NOTIFY + long-poll + apply"))


async def _hold(port: int, token: str, cursor: int, n: int, wait: int) -> list[float]:
    """`n` long-polls on raw sockets (an HTTP client's pool would be the bottleneck at this
    count); returns when each got its whole answer."""
    request = (f"GET /v1/changes?cursor={cursor}&live=true&wait={wait}&spaces= HTTP/1.1\r\n"
               f"Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
               "Connection: close\r\n\r\n").encode()

    async def one() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        data = await reader.read()
        writer.close()
        if b" 200 " not in data.split(b"\r\n", 1)[0]:
            raise RuntimeError(data[:200])
        return time.perf_counter()

    return await asyncio.gather(*(one() for _ in range(n)))


def log_latency_phase(dsn: str, index: SearchIndex, log: ChangeLog, serve: Serve,
                      corpus: Corpus, rate: int, seconds: float, workdir: Path,
                      table: list) -> None:
    """The sync part alone: change-log commit (as the worker's apply makes it) -> applied
    in a live-following device shard."""
    path = workdir / "log-live.db"
    load(dsn, 1, "loglive", index, log, corpus, start=20_000_000)
    committed: dict[str, float] = {}
    follower = LiveFollower(SyncClient(serve.url, issue_token(SECRET, ["loglive"]), path,
                                       spaces=["local"]))
    follower.thread.start()
    try:
        while not path.exists():
            time.sleep(0.01)
        time.sleep(0.5)
        docs = corpus.docs(int(rate * seconds), ["loglive"], start=30_000_000)
        prepared = index.prepare(docs)
        started = time.perf_counter()
        with index.backend.connect() as conn:
            for i, (d, p) in enumerate(zip(docs, prepared)):
                with conn.transaction():
                    index.backend.write([p], conn=conn)
                    log.append(conn, [ChangeEntry("loglive", *d.key, "u", 3)])
                committed[d.object_id] = time.time()
                delay = started + (i + 1) / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
        follower.wait_for(committed)
    finally:
        follower.close()
    ms = follower.latencies_ms(committed)
    table.append((f"Change-log commit -> applied in a live device shard, {rate} txn/s "
                  f"({len(ms)} rows)", f"p50 {np.percentile(ms, 50):.1f} ms",
                  f"p99 {np.percentile(ms, 99):.1f} ms", "NOTIFY + long-poll + apply only"))


def devices_phase(dsn: str, index: SearchIndex, log: ChangeLog, serve: Serve, corpus: Corpus,
                  devices: int, table: list) -> None:
    token = issue_token(SECRET, ["idle"])
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = log.max_seq(conn)
    before = serve.rss_mb()
    result: list[list[float]] = []
    t = threading.Thread(target=lambda: result.append(
        asyncio.run(_hold(serve.port, token, cursor, devices, 60))))
    t.start()
    time.sleep(min(20, 2 + devices / 100))  # let every long-poll connect and park
    holding = serve.rss_mb()
    changed = time.perf_counter()
    load(dsn, 1, "idle", index, log, corpus, start=10_000_000)
    t.join(timeout=120)
    if not result:
        table.append((f"{devices:,} idle long-polls on one serve process", "did not finish",
                      "", ""))
        return
    done = np.asarray(result[0]) - changed
    table.append((f"{devices:,} concurrent idle long-polls on one serve process",
                  f"RSS {before:.0f} -> {holding:.0f} MB",
                  f"one change answers all in {done.max() * 1000:,.0f} ms "
                  f"(p50 {np.percentile(done, 50) * 1000:,.0f} ms)", ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export-rows", type=int, nargs="+", default=[10_000, 50_000])
    ap.add_argument("--export-rounds", type=int, default=1,
                    help="exports of each size (the median is reported)")
    ap.add_argument("--export-baseline", metavar="REF",
                    help="also run export_shard as of git revision REF, alternating with the current")
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--latency-seconds", type=float, default=20)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--phase-limit", type=int, default=600, help="seconds per phase (hard)")
    ap.add_argument("--phases", nargs="+", default=["export", "delta", "devices", "log-live",
                                                     "live"])
    args = ap.parse_args()
    from slipstream.worker.observe import configure_logging

    configure_logging(json=True, level="error")
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(20000, resource.getrlimit(
        resource.RLIMIT_NOFILE)[1]),) * 2)
    table: list[tuple] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    with EmbeddedPostgres(settings={"maintenance_work_mem": "512MB"}) as server:
        dsn = make_db(server, "bench_sync")
        backend = PostgresBackend(dsn, spaces={"local": DIM}, hnsw=False)
        index = SearchIndex(backend, HashingEmbedder(DIM))
        log = ChangeLog()
        with psycopg.connect(dsn) as conn:
            log.migrate(conn)
        corpus = Corpus(seed=4)
        serve = None
        try:
            with limit(args.phase_limit, "load"):
                first = args.export_rows[0]
                t0 = time.perf_counter()
                load(dsn, first, f"p{first}", index, log, corpus, 0)
                for n in args.export_rows[1:]:
                    replicate(dsn, log, f"p{first}", f"p{n}", n)
                print(f"loaded {sum(args.export_rows):,} rows in {time.perf_counter() - t0:.0f} s",
                      flush=True)
            serve = Serve(dsn, workdir)
            phases = [
                ("export", lambda: export_phase(dsn, args.export_rows, serve, workdir, table,
                                              args.export_rounds, args.export_baseline)),
                ("delta", lambda: delta_phase(dsn, index, log, serve, workdir, corpus, table,
                                                  args.export_rows[0])),
                ("devices", lambda: devices_phase(dsn, index, log, serve, corpus, args.devices,
                                                  table)),
                ("log-live", lambda: log_latency_phase(dsn, index, log, serve, corpus, args.rate,
                                                       args.latency_seconds, workdir, table)),
                ("live", lambda: latency_phase(server, args.rate, args.latency_seconds, workdir,
                                               table)),
            ]
            for name, run in phases:
                if name not in args.phases:
                    continue
                try:
                    with limit(args.phase_limit, name):
                        run()
                except PhaseTimeout as exc:
                    table.append((f"{name}: stopped", str(exc), "", ""))
        finally:
            if serve is not None:
                serve.stop()
            backend.close()
            shutil.rmtree(workdir, ignore_errors=True)  # shards of up to hundreds of MB
    print_table(f"slipstream sync benchmark — {platform.machine()}, {os.cpu_count()} cores "
                f"(shared), Python {platform.python_version()}, embedded PostgreSQL 18",
                ("what", "result", "detail", ""), table)


if __name__ == "__main__":
    main()
