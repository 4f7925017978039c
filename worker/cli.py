"""The `slipstream` command line: setup, run, status, dead letters, and the demo.

Every command reads one TOML config (`--config`, or `$SLIPSTREAM_CONFIG`, or
./slipstream.toml). Any `SlipstreamError` is printed as one clear line and exits 1;
a configuration error exits 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click
from slipstream.index.errors import ConfigurationError, SlipstreamError

CONFIG = click.option(
    "--config", "config_path", envvar="SLIPSTREAM_CONFIG", default="slipstream.toml",
    show_default=True, type=click.Path(dir_okay=False),
    help="The worker's TOML configuration (see deploy/slipstream.example.toml).")


def _errors(func: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigurationError as exc:
            click.echo(f"configuration error: {exc}", err=True)
            sys.exit(2)
        except SlipstreamError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
    return wrapper


def _worker(config_path: str):
    from .app import Worker
    from .config import load_config

    return Worker(load_config(config_path))


@click.group()
@click.version_option(package_name="slipstream")
def main() -> None:
    """slipstream: hybrid search for an existing Postgres application, fed by logical replication."""


@main.command()
@CONFIG
@_errors
def check(config_path: str) -> None:
    """Load and validate the configuration; print it with secrets hidden."""
    from .config import load_config

    cfg = load_config(config_path)
    click.echo(json.dumps(cfg.safe_dict(), indent=2, default=str))


@main.command()
@CONFIG
@_errors
def setup(config_path: str) -> None:
    """Create the publication, slot and search schema; copy existing rows. Idempotent."""
    from .logs import configure_logging
    from .progress import terminal_progress

    configure_logging(json=False)
    worker = _worker(config_path)
    progress = terminal_progress(worker.estimate_rows)
    try:
        report = worker.setup(progress=progress)
    finally:
        progress.close()
        worker.close()
    click.echo(f"publication: {'created' if report.created_publication else 'present'}"
               + (f", added {', '.join(report.added_tables)}" if report.added_tables else ""))
    click.echo(f"slot: {'created' if report.created_slot else 'present'}")
    for table, n in report.copied.items():
        click.echo(f"snapshot: {table}: {n:,} rows")
    if report.dead_letters:
        for table, (n, error) in report.dead_letters.items():
            click.echo(f"error: {n:,} rows of {table} went to dead letters; first error: {error}",
                       err=True)
        click.echo("fix the mapper or the rows, then run `slipstream deadletter retry` "
                   "(`slipstream deadletter list` shows each row and its error)", err=True)
        sys.exit(1)


@main.command()
@CONFIG
@click.option("--log-format", type=click.Choice(["json", "console"]), default="json", show_default=True)
@click.option("--no-http", is_flag=True, help="Do not serve /metrics, /healthz and /readyz.")
@_errors
def run(config_path: str, log_format: str, no_http: bool) -> None:
    """Follow the slot and keep the search index in step until SIGTERM or SIGINT."""
    from .logs import configure_logging

    configure_logging(json=log_format == "json")
    worker = _worker(config_path)
    try:
        worker.run(http=not no_http)
    finally:
        worker.close()


@main.command()
@CONFIG
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_errors
def status(config_path: str, as_json: bool) -> None:
    """Slot, lag, checkpoint, rows per type, dead letters, pending embeddings."""
    worker = _worker(config_path)
    try:
        st = worker.status()
    finally:
        worker.close()
    if as_json:
        click.echo(json.dumps({
            "slot": st.slot, "checkpoint": st.checkpoint,
            "counts": [{"object_type": t, "live": n, "tombstones": d} for t, n, d in st.counts],
            "dead_letters": st.dead_letters, "dead_letters_by_table": st.dead_letters_by_table,
            "pending_embeddings": st.pending_embeddings,
            "snapshot": [{"table": t, "rows": n, "done": d} for t, n, d in st.snapshot]}, indent=2))
        return
    if st.slot is None:
        click.echo(f"slot {worker.slot}: missing (run `slipstream setup`)")
    else:
        s = st.slot
        lag = "unknown" if s["lag_bytes"] is None else f"{s['lag_bytes']:,} bytes"
        click.echo(f"slot {s['name']}: {'active' if s['active'] else 'inactive'}, "
                   f"lag {lag}, confirmed {s['confirmed_flush_lsn']}, WAL {s['wal_status']}")
        if s["wal_status"] == "lost":
            from .errors import slot_invalidated_message

            click.echo(slot_invalidated_message(s["name"], worker.config.search.schema), err=True)
    if st.checkpoint:
        c = st.checkpoint
        click.echo(f"checkpoint: {c['lsn']}, last seq {c['last_seq']:,}, at {c['updated_at']}")
    for t, n, d in st.counts:
        click.echo(f"  {t:<24} {n:>10,} live {d:>10,} tombstones")
    for t, n, done in st.snapshot:
        click.echo(f"snapshot {t}: {n:,} rows{'' if done else ' (in progress)'}")
    click.echo(f"dead letters: {st.dead_letters:,}   pending embeddings: {st.pending_embeddings:,}")
    for t, n in st.dead_letters_by_table.items():
        click.echo(f"  dead letters in {t}: {n:,} (`slipstream deadletter list` shows them)")


@main.group()
def deadletter() -> None:
    """Rows whose mapping failed: list them, retry them after a fix."""


@deadletter.command("list")
@CONFIG
@click.option("--limit", default=50, show_default=True)
@_errors
def deadletter_list(config_path: str, limit: int) -> None:
    worker = _worker(config_path)
    try:
        rows = worker.dead_letters(limit)
    finally:
        worker.close()
    if not rows:
        click.echo("no open dead letters")
    for id_, created, relation, op, key, error in rows:
        click.echo(f"#{id_} {created:%Y-%m-%d %H:%M:%S} {relation} {op} key={key}\n    {error}")


@deadletter.command("retry")
@CONFIG
@click.option("--id", "ids", type=int, multiple=True, help="Only these dead letters (default: all open).")
@_errors
def deadletter_retry(config_path: str, ids: tuple[int, ...]) -> None:
    worker = _worker(config_path)
    try:
        resolved, failing = worker.retry_dead_letters(list(ids) or None)
    finally:
        worker.close()
    click.echo(f"resolved {resolved}, still failing {failing}")
    if failing:
        sys.exit(1)


@main.command()
@click.option("--keep", is_flag=True, help="Leave the embedded Postgres running at the end.")
@_errors
def demo(keep: bool) -> None:
    """Run the end-to-end demo on an embedded Postgres (nothing to install)."""
    from .demo import run_demo

    run_demo(keep=keep)
