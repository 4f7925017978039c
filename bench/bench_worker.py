"""Worker benchmarks: apply throughput against a COPY floor, commit-to-searchable latency, CPU.

    python bench/bench_worker.py                 # initial copy, 50k inserts + 50k updates, latency
    python bench/bench_worker.py --rows 10000 --latency-seconds 10
    python bench/bench_worker.py --skip-throughput --modes exact

Initial copy: `setup` on a source table that already holds `--rows` rows (the copy in
the slot's exported snapshot, through the same apply as the stream), timed with the
process's CPU, against the same COPY floor.

Throughput: the source table's changes are written while the worker is stopped, then
the worker is started and timed until it has applied them all (decode, map, analyse,
embed with HashingEmbedder(384), write). The floor is a COPY of the same final search
rows into an identical, identically indexed table, timed in the same run. Both are
measured with HNSW and in exact-scan mode (no HNSW index). With HNSW, rows are
searchable once applied and the worker's indexer thread adds them to the HNSW side
table after (`index/pg_ann.py`): the bench reports both rates, and the ratio to the
floor (which copies into a side table with its HNSW index too) is taken at the second.

Latency: a writer process commits single-row transactions at a fixed rate; for each
one the time from its source commit to the commit of the apply transaction that made
it searchable is recorded; with HNSW, also how many rows still waited for the side
table when the writer stopped, and how long they took. Each mode runs twice: first
plain (its latency and CPU are the headline figures), then with a breakdown by stage,
wall time and the CPU time of the thread doing the work, taken by wrapping the worker's
functions in this process (not by changing them); the wrappers cost CPU of their own,
so that run's figures are marked "stages timed". Beside it, the replication floor: the
same writer against a bare replication client that only reads the stream, so the part of
the latency that is Postgres's own (commit, WAL flush, the walsender's decoding and
wake-up) shows apart from the worker's. CPU: the bench process runs only
the worker (the writer is a child process), so its CPU time while idle and while the
writer runs is the worker's.

Each phase starts from a settled server: the database of the phase before is dropped
(its slot first) and a checkpoint writes out its dirty buffers, so neither its
autovacuum nor a checkpoint lands inside the next phase's measurements.

Every phase has a hard time limit: a phase that overruns is reported as stalled and
the bench exits. The embedded PostgreSQL is stopped on every exit, SIGINT and SIGTERM
included.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psycopg

sys.path.insert(0, os.path.dirname(__file__))

from corpus import Corpus
import pgdb
from slipstream.worker.app import Worker
from slipstream.worker.config import load_config
from slipstream.worker.localpg import EmbeddedPostgres
from slipstream.worker.lsn import parse_lsn
from slipstream.worker.pgoutput import Commit, decode
from slipstream.worker.replication import ReplicationConnection, XLogData

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


class Stalled(Exception):
    pass


@contextmanager
def phase(name: str, limit: float):
    """Run a phase under a hard time limit: on overrun, say so and end the bench (cleanly
    through SIGTERM; if even that does not return within 60 s, at once)."""
    def overrun() -> None:
        print(f"\nSTALLED: phase '{name}' did not finish within its limit of {limit:.0f} s; "
              "stopping the bench", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    def hard() -> None:
        print(f"phase '{name}' ignored SIGTERM; exiting now", file=sys.stderr, flush=True)
        if _server is not None:
            _server.stop(mode="immediate")
        os._exit(3)

    timers = [threading.Timer(limit, overrun), threading.Timer(limit + 60, hard)]
    for t in timers:
        t.daemon = True
        t.start()
    started = time.perf_counter()
    try:
        yield
    finally:
        for t in timers:
            t.cancel()
    print(f"  {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


_server: EmbeddedPostgres | None = None


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the `with EmbeddedPostgres` block: Postgres stops


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def sys_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def make_db(server: EmbeddedPostgres, name: str) -> str:
    return pgdb.make_db(server, name, "CREATE TABLE items (id int PRIMARY KEY, tenant int NOT NULL, "
                        "title text, body text)")


def worker_for(dsn: str, hnsw: bool) -> Worker:
    path = Path(tempfile.mkdtemp()) / "bench.toml"
    slot = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    path.write_text(CONFIG.format(dsn=dsn, slot=slot, hnsw="true" if hnsw else "false"))
    return Worker(load_config(path))


def start(runner) -> threading.Thread:
    thread = threading.Thread(target=runner.run, daemon=True, name="slipstream-reader")
    thread.start()
    while not runner.ready.wait(0.1):
        if not thread.is_alive():
            raise RuntimeError("the worker stopped before it streamed")
    return thread


def stop(runner, thread: threading.Thread) -> None:
    runner.stop()
    thread.join(timeout=60)
    if thread.is_alive():
        raise Stalled("the worker did not stop within 60 s")


def ann_drained(worker: Worker, started: float, thread: threading.Thread) -> float:
    """Seconds from `started` until the worker's HNSW queue is empty (the side tables
    hold every row written so far)."""
    while worker.backend.ann_queue_rows():
        if not thread.is_alive():
            raise RuntimeError("worker stopped")
        time.sleep(0.05)
    return time.perf_counter() - started


def catch_up(worker: Worker, dsn: str, profile: str | None = None) -> tuple[float, float]:
    """Start the worker, time until everything committed so far is applied (searchable)
    and until its HNSW side tables hold it too (indexed), stop it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        (goal,) = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    runner = worker.runner()
    started = time.perf_counter()
    thread = threading.Thread(target=runner.run, daemon=True, name="slipstream-reader")
    thread.start()
    spy = None
    if profile:
        import shutil
        import subprocess
        exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.path.exists(exe):
            raise SystemExit("--profile needs py-spy: pip install py-spy")
        spy = subprocess.Popen([exe, "record", "--gil", "--format", "raw", "--rate", "200", "--threads",
                                "--pid", str(os.getpid()), "-o", profile],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while runner.flushed < parse_lsn(goal):
            if not thread.is_alive():
                raise RuntimeError("worker stopped")
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        indexed = ann_drained(worker, started, thread)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
    stop(runner, thread)
    return elapsed, indexed


def copy_floor(dsn: str, hnsw: bool) -> float:
    """COPY the final search rows into an identical, identically indexed table (and, with
    HNSW, the vectors into a copy of the HNSW side table) in one transaction; seconds."""
    tables = [("floor", "docs")] + ([("floor_ann", "ann_local")] if hnsw else [])
    with psycopg.connect(dsn, autocommit=True) as conn:
        bufs = []
        for floor, source in tables:
            conn.execute(f"DROP TABLE IF EXISTS slipstream.{floor}")
            conn.execute(f"CREATE TABLE slipstream.{floor} (LIKE slipstream.{source} INCLUDING ALL)")
            buf = bytearray()
            with conn.cursor().copy(f"COPY (SELECT * FROM slipstream.{source}) TO STDOUT") as copy:
                for data in copy:
                    buf += data
            bufs.append(bytes(buf))
        started = time.perf_counter()
        with conn.transaction():
            for (floor, _), buf in zip(tables, bufs):
                with conn.cursor().copy(f"COPY slipstream.{floor} FROM STDIN") as copy:
                    copy.write(buf)
        elapsed = time.perf_counter() - started
        for floor, _ in tables:
            conn.execute(f"DROP TABLE slipstream.{floor}")
    return elapsed


def throughput(server: EmbeddedPostgres, rows: int, hnsw: bool, table: list, limit: float,
               profile: str | None) -> None:
    mode = "HNSW" if hnsw else "exact-scan"
    dsn = make_db(server, f"bench_{'hnsw' if hnsw else 'exact'}")
    worker = worker_for(dsn, hnsw)
    worker.setup()
    corpus = Corpus(seed=3)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start_ in range(0, rows, 1000):
            with conn.transaction(), conn.cursor().copy(
                    "COPY items (id, tenant, title, body) FROM STDIN") as copy:
                for i in range(start_, min(rows, start_ + 1000)):
                    copy.write_row((i, i % 100, corpus.words(6), corpus.words(50)))
    with phase(f"apply {rows:,} inserts, {mode}", limit):
        cpu = cpu_seconds()
        t_ins, x_ins = catch_up(worker, dsn, profile and f"{profile}.inserts.txt")
        cpu_ins = cpu_seconds() - cpu
    floor_ins = copy_floor(dsn, hnsw)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start_ in range(0, rows, 1000):
            conn.execute("UPDATE items SET title = title || ' revised', body = body || ' edited' "
                         "WHERE id >= %s AND id < %s", (start_, start_ + 1000))
    with phase(f"apply {rows:,} updates, {mode}", limit):
        cpu = cpu_seconds()
        t_upd, x_upd = catch_up(worker, dsn, profile and f"{profile}.updates.txt")
        cpu_upd = cpu_seconds() - cpu
    floor_upd = copy_floor(dsn, hnsw)
    worker.close()
    settle(server, drop=f"bench_{'hnsw' if hnsw else 'exact'}")
    for what, t, x, floor, cpu in (("inserts", t_ins, x_ins, floor_ins, cpu_ins),
                                   ("updates", t_upd, x_upd, floor_upd, cpu_upd)):
        # With HNSW the ratio is to the time the side table held every row too: the
        # floor ends with the same rows in the same indexes.
        result = f"{rows / t:,.0f} changes/s" + (f" ({rows / x:,.0f}/s HNSW-indexed)" if hnsw else "")
        table.append((f"Apply {rows:,} {what}, {mode}", result,
                      f"{rows / floor:,.0f} rows/s", f"{floor / x:.2f}",
                      f"{cpu / x * 100:.0f}% of a core, {cpu / rows * 1000:.2f} ms CPU/change"))


def initial_copy(server: EmbeddedPostgres, rows: int, table: list, limit: float) -> None:
    """`setup` on a source table that already holds `rows` rows: the initial copy, in the
    exported snapshot, through the same apply as the stream (exact-scan mode: an HNSW
    side table is built after the copy, by the running worker)."""
    dsn = make_db(server, "bench_copy")
    corpus = Corpus(seed=3)
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor().copy(
            "COPY items (id, tenant, title, body) FROM STDIN") as copy:
        for i in range(rows):
            copy.write_row((i, i % 100, corpus.words(6), corpus.words(50)))
    worker = worker_for(dsn, False)
    with phase(f"initial copy of {rows:,} rows", limit):
        cpu, started = cpu_seconds(), time.perf_counter()
        report = worker.setup()
        elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    if report.copied != {"public.items": rows} or report.dead_letters:
        raise RuntimeError(f"the initial copy did not copy every row: {report}")
    floor = copy_floor(dsn, False)
    worker.close()
    settle(server, drop="bench_copy")
    table.append((f"Initial copy of {rows:,} existing rows (`setup`), exact-scan", f"{rows / elapsed:,.0f} rows/s",
                  f"{rows / floor:,.0f} rows/s", f"{floor / elapsed:.2f}",
                  f"{cpu / elapsed * 100:.0f}% of a core, {cpu / rows * 1000:.2f} ms CPU/row"))


def settle(server: EmbeddedPostgres, drop: str | None = None) -> None:
    """Start the next phase from a settled server: drop a finished phase's database (its
    slot first; its autovacuum would otherwise run during the next phase) and write out
    dirty buffers (a checkpoint, instead of one falling inside the next phase)."""
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        if drop is not None:  # a closed worker's walsender may still be exiting: wait for it
            admin.execute("SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots "
                          "WHERE database = %s AND active_pid IS NOT NULL", (drop,))
            admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                          "WHERE database = %s", (drop,))
            admin.execute(f'DROP DATABASE IF EXISTS "{drop}" WITH (FORCE)')
        admin.execute("CHECKPOINT")


# -- latency ------------------------------------------------------------------------------

class Stages:
    """Wall time of each stage, per batch and per transaction, and the CPU time the
    worker's threads spent in each (`time.thread_time`), from wrapped functions."""

    def __init__(self) -> None:
        self.arrived: dict[int, float] = {}  # end LSN -> when the reader had the transaction
        self.batch: dict[int, dict[str, float]] = {}  # id(batch) -> stage -> seconds / instants
        self.current: dict[str, float] | None = None  # the batch being planned
        self.decode = 0.0
        self.decoded = 0
        self.rows: list[dict[str, float]] = []
        self.cpu: dict[str, float] = {}  # stage -> CPU seconds, all transactions

    def charge(self, name: str, since: float) -> None:
        self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - since

    def timed(self, name: str, fn):
        def wrapper(*args, **kw):
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kw)
            finally:
                cur = self.current
                if cur is not None:
                    cur[name] = cur.get(name, 0.0) + time.perf_counter() - started
                    self.charge(name, cpu)
        return wrapper

    def install(self, runner) -> None:
        import slipstream.index.search as search_mod
        import slipstream.worker.runner as runner_mod

        stages = self
        decode = runner_mod.decode

        def timed_decode(payload):
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return decode(payload)
            finally:
                stages.decode += time.perf_counter() - started
                stages.decoded += 1
                stages.charge("decode", cpu)

        class Assembler(runner_mod.TxnAssembler):
            def feed(self, event):
                items = super().feed(event)
                now = time.time()
                for item in items:
                    end = getattr(item, "end_lsn", None)
                    if end is not None:
                        stages.arrived[end] = now
                return items

        saved = runner_mod.decode, runner_mod.TxnAssembler, search_mod.analyze_doc

        def uninstall() -> None:
            runner_mod.decode, runner_mod.TxnAssembler, search_mod.analyze_doc = saved

        self.uninstall = uninstall
        runner_mod.decode = timed_decode
        runner_mod.TxnAssembler = Assembler
        search_mod.analyze_doc = self.timed("analyse", search_mod.analyze_doc)
        make = runner.make_applier

        def make_applier():
            applier = make()
            plan, commit, lookup = applier.plan, applier.commit, applier.mappers
            for space, emb in list(applier.index.embedders.items()):
                emb.embed = self.timed("embed", emb.embed)

            def timed_lookup(relation):
                mapper = lookup(relation)
                return None if mapper is None else self.timed("map", mapper)

            def timed_plan(batch):
                rec = {"plan_start": time.time()}
                self.current = rec
                cpu = time.thread_time()
                try:
                    return plan(batch)
                finally:
                    self.charge("plan", cpu)
                    self.current = None
                    rec["plan_end"] = time.time()
                    self.batch[id(batch)] = rec

            def timed_commit(planned, also=None):
                rec = self.batch.setdefault(id(planned.batch), {})
                rec["commit_start"] = time.time()
                cpu = time.thread_time()
                try:
                    return commit(planned, also)
                finally:
                    self.charge("commit", cpu)
                    rec["commit_end"] = time.time()

            applier.mappers, applier.plan, applier.commit = timed_lookup, timed_plan, timed_commit
            return applier

        runner.make_applier = make_applier

    def done(self, batch) -> None:
        now = time.time()
        rec = self.batch.pop(id(batch), {})
        n = max(1, len(batch.completed))
        for t in batch.completed:
            arrived = self.arrived.pop(t.end_lsn, now)
            plan = rec.get("plan_end", now) - rec.get("plan_start", now)
            work = sum(rec.get(k, 0.0) for k in ("map", "analyse", "embed"))
            self.rows.append({
                "total": now - t.commit_ts,
                "source commit -> reader has it": arrived - t.commit_ts,
                "reader -> planning starts": rec.get("plan_start", now) - arrived,
                "map": rec.get("map", 0.0) / n,
                "analyse": rec.get("analyse", 0.0) / n,
                "embed": rec.get("embed", 0.0) / n,
                "plan: state reads and rest": (plan - work) / n,
                "planned -> commit starts": rec.get("commit_start", now) - rec.get("plan_end", now),
                "commit (write + fsync)": rec.get("commit_end", now) - rec.get("commit_start", now),
                "commit -> reported": now - rec.get("commit_end", now),
            })


def writer(dsn: str, rate: int, seconds: float, start_id: int, took=None) -> None:
    """Child process: single-row transactions at `rate` per second, durably committed;
    the seconds the writing took go into `took` (a shared double), when given."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends it
    corpus = Corpus(seed=5)
    n = int(rate * seconds)
    # The text is drawn before the clock starts: drawing it costs more CPU than the insert,
    # and the writer shares the machine with the worker it measures.
    rows = [(start_id + i, i % 100, corpus.words(6), corpus.words(40)) for i in range(n)]
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SET synchronous_commit = on")
            started = time.perf_counter()
            for i, row in enumerate(rows):
                conn.execute(b"INSERT INTO items VALUES (%s, %s, %s, %s)", row)
                delay = started + (i + 1) / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            if took is not None:
                took.value = time.perf_counter() - started
    except psycopg.OperationalError:
        pass  # the bench is stopping and took the server down: nothing to report


def durable_commit_ms(dsn: str, n: int = 200) -> float:
    """p50 of a bare single-row INSERT + COMMIT on the search database: the fsync floor."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS slipstream.fsync_probe (x int)")
        out = []
        for i in range(n):
            started = time.perf_counter()
            conn.execute("INSERT INTO slipstream.fsync_probe VALUES (%s)", (i,))
            out.append(time.perf_counter() - started)
        conn.execute("DROP TABLE slipstream.fsync_probe")
    return float(np.percentile(np.asarray(out) * 1000, 50))


def replication_floor(server: EmbeddedPostgres, rate: int, seconds: float, limit: float) -> tuple[float, float]:
    """p50/p99 ms from a source commit to a bare replication client holding its Commit
    message, at `rate` single-row transactions a second, with no worker: what Postgres
    and the walsender take on these cores before any of the worker's own work."""
    dsn = make_db(server, "bench_floor")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE PUBLICATION bench_floor FOR TABLE items")
        conn.execute("SELECT pg_create_logical_replication_slot('bench_floor', 'pgoutput')")
    lags: list[float] = []
    with phase("replication floor", limit):
        conn = ReplicationConnection.connect(dsn)
        try:
            conn.start_replication("bench_floor", publication_names=["bench_floor"])
            proc = multiprocessing.get_context("spawn").Process(
                target=writer, args=(dsn, rate, seconds, 0), daemon=True)
            proc.start()
            try:
                while len(lags) < int(rate * seconds):
                    message = conn.read_message(timeout=10)
                    if message is None:
                        raise Stalled("the replication floor's stream went quiet")
                    if isinstance(message, XLogData):
                        event = decode(message.payload)
                        if isinstance(event, Commit):
                            lags.append(time.time() - event.commit_ts.timestamp())
            finally:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.terminate()
        finally:
            conn.close()
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute("DROP DATABASE bench_floor WITH (FORCE)")
    ms = np.asarray(lags) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def latency(server: EmbeddedPostgres, rate: int, seconds: float, hnsw: bool, table: list,
            stages_table: list | None, limit: float, idle_seconds: float) -> None:
    """One latency run. With `stages_table`, the worker's functions are wrapped to time
    each stage (which costs CPU of its own); without it, only each transaction's total
    is taken, from the batch hook, and the CPU figures are the worker's alone."""
    mode = "HNSW" if hnsw else "exact-scan"
    dsn = make_db(server, f"bench_latency_{'hnsw' if hnsw else 'exact'}")
    worker = worker_for(dsn, hnsw)
    worker.setup()
    settle(server)
    runner = worker.runner()
    stages = Stages()
    if stages_table is not None:
        stages.install(runner)
    inner = runner.on_batch

    def on_batch(result, batch) -> None:
        if stages_table is not None:
            stages.done(batch)
        else:
            now = time.time()
            stages.rows.extend({"total": now - t.commit_ts} for t in batch.completed)
        if inner is not None:
            inner(result, batch)

    runner.on_batch = on_batch
    ctx = multiprocessing.get_context("spawn")
    with phase(f"latency, {mode}", limit):
        thread = start(runner)
        try:
            time.sleep(1.0)  # settle
            cpu, wall = cpu_seconds(), time.perf_counter()
            time.sleep(idle_seconds)
            idle = (cpu_seconds() - cpu) / (time.perf_counter() - wall)
            took = ctx.Value("d", 0.0)
            proc = ctx.Process(target=writer, args=(dsn, rate, seconds, 0, took), daemon=True)
            cpu, sys_cpu, wall = cpu_seconds(), sys_seconds(), time.perf_counter()
            proc.start()
            proc.join(timeout=seconds + 120)
            if proc.is_alive():
                proc.terminate()
                raise Stalled(f"the writer did not finish {rate * seconds:.0f} transactions in time")
            wrote = took.value
            with psycopg.connect(dsn, autocommit=True) as conn:
                (goal,) = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            while runner.flushed < parse_lsn(goal):
                if not thread.is_alive():
                    raise RuntimeError("the worker stopped")
                time.sleep(0.01)
            busy, busy_sys = cpu_seconds() - cpu, sys_seconds() - sys_cpu
            queued = worker.backend.ann_queue_rows()  # written but not yet HNSW-indexed
            drained = ann_drained(worker, time.perf_counter(), thread)
        finally:
            stop(runner, thread)
            if stages_table is not None:
                stages.uninstall()
        fsync_ms = durable_commit_ms(dsn)
    worker.close()
    settle(server, drop=f"bench_latency_{'hnsw' if hnsw else 'exact'}")
    rows = stages.rows
    total = np.asarray([r["total"] for r in rows]) * 1000
    what = (f"Commit-to-searchable, {rate} txn/s for {seconds:.0f} s ({len(rows)} txns, written in "
            f"{wrote:.0f} s), {mode}" + ("" if stages_table is None else ", stages timed"))
    if hnsw:
        what += f"; HNSW queue at the end {queued} rows, indexed {drained:.1f} s later"
    table.append((what,
                  f"p50 {np.percentile(total, 50):.1f} ms", f"p99 {np.percentile(total, 99):.1f} ms",
                  f"{busy / max(1, len(rows)) * 1000:.2f} ms CPU/txn ({busy_sys / max(busy, 1e-9):.0%} system)",
                  f"idle {idle * 100:.2f}% of a core"))
    if stages_table is None:
        return
    names = [k for k in rows[0] if k != "total"] if rows else []
    decode_ms = stages.decode / max(1, stages.decoded) * 1000 * 3  # Begin, Insert, Commit
    # CPU per transaction, where a stage is work rather than waiting; the rest of the
    # process's CPU is reading the stream, the batcher, metrics and status updates.
    per_txn = {k: v * 1000 / max(1, len(rows)) for k, v in stages.cpu.items()}
    cpu = {"map": per_txn.get("map", 0.0), "analyse": per_txn.get("analyse", 0.0),
           "embed": per_txn.get("embed", 0.0), "commit (write + fsync)": per_txn.get("commit", 0.0)}
    cpu["plan: state reads and rest"] = per_txn.get("plan", 0.0) - cpu["map"] - cpu["analyse"] - cpu["embed"]
    cpu["decode (3 messages)"] = per_txn.get("decode", 0.0)
    busy_ms = busy * 1000 / max(1, len(rows))
    stages_table.append((mode, [("decode (3 messages)", decode_ms, decode_ms, cpu["decode (3 messages)"])] + [
        (k, float(np.percentile([r[k] * 1000 for r in rows], 50)),
         float(np.percentile([r[k] * 1000 for r in rows], 99)), cpu.get(k)) for k in names] + [
        ("the rest: reading the stream, batching, metrics, status updates", None, None,
         busy_ms - sum(cpu.values()))],
        fsync_ms))


def main() -> None:
    global _server
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--latency-seconds", type=float, default=30)
    ap.add_argument("--idle-seconds", type=float, default=5)
    ap.add_argument("--floor-seconds", type=float, default=10,
                    help="seconds of the replication floor (a bare client, no worker); 0 skips it")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-copy", action="store_true", help="skip the initial copy phase")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-stages", action="store_true",
                    help="skip the second latency run per mode, the one that times each stage")
    ap.add_argument("--modes", choices=["both", "exact", "hnsw"], default="both")
    ap.add_argument("--phase-limit", type=float, default=900, help="hard limit per phase, seconds")
    ap.add_argument("--profile", metavar="PREFIX",
                    help="sample the exact-scan apply phases with py-spy into PREFIX.*.txt")
    args = ap.parse_args()
    from slipstream.worker.logs import configure_logging

    configure_logging(json=True, level="error")
    signal.signal(signal.SIGTERM, _on_signal)

    signal.signal(signal.SIGINT, _on_signal)
    modes = {"both": (False, True), "exact": (False,), "hnsw": (True,)}[args.modes]
    table: list[tuple] = []
    stages_table: list[tuple] = []
    try:
        with EmbeddedPostgres(settings={"maintenance_work_mem": "512MB"}) as server:
            _server = server
            if not args.skip_copy:
                initial_copy(server, args.rows, table, args.phase_limit)
            if not args.skip_throughput:
                for hnsw in modes:
                    throughput(server, args.rows, hnsw, table, args.phase_limit,
                               None if hnsw else args.profile)
            if not args.skip_latency:
                if args.floor_seconds > 0:
                    floor = replication_floor(server, args.rate, args.floor_seconds, args.phase_limit)
                    table.append((f"Source commit -> a bare replication client, {args.rate} txn/s "
                                  f"for {args.floor_seconds:.0f} s (no worker)",
                                  f"p50 {floor[0]:.2f} ms", f"p99 {floor[1]:.2f} ms", "", ""))
                for hnsw in modes:
                    latency(server, args.rate, args.latency_seconds, hnsw, table, None,
                            args.phase_limit, args.idle_seconds)
                    if not args.skip_stages:
                        latency(server, args.rate, args.latency_seconds, hnsw, table, stages_table,
                                args.phase_limit, args.idle_seconds)
    except Stalled as exc:
        print(f"STALLED: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        _server = None
    print(f"\nslipstream worker benchmark — {platform.machine()}, {os.cpu_count()} cores (shared), "
          f"Python {platform.python_version()}, embedded PostgreSQL 18 (durable settings), "
          f"load average at the end {os.getloadavg()[0]:.1f}\n")
    width = max([len(r[0]) for r in table] + [4])
    print(f"| {'what'.ljust(width)} | result | floor / p99 | ratio / CPU | CPU |")
    print(f"|{'-' * (width + 2)}|---|---|---|---|")
    for row in table:
        print(f"| {row[0].ljust(width)} | " + " | ".join(row[1:]) + " |")
    for mode, rows, fsync_ms in stages_table:
        print(f"\nWhere the time goes, {mode} (per transaction, ms, wall and the worker's CPU; a bare durable single-row "
              f"commit on the search database: p50 {fsync_ms:.2f} ms)\n")
        print("| stage | p50 | p99 | CPU, mean |\n|---|---|---|---|")
        for name, p50, p99, cpu in rows:
            cells = ["" if v is None else f"{v:.2f}" for v in (p50, p99, cpu)]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
