"""The `slipstream` command line: setup, run, status, dead letters, teardown, and the demo.

Every command reads one TOML config (`--config`, or `$SLIPSTREAM_CONFIG`, or
./slipstream.toml). Any `SlipstreamError`, or a database error a command does not
handle itself, is printed as one clear line and exits 1; a configuration error exits 2.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

import click
import psycopg
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
        except psycopg.Error as exc:  # one the command does not handle itself: still one line
            state = f" (SQLSTATE {exc.sqlstate})" if exc.sqlstate else ""
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None:
                # No answer at all: the server is down, unreachable, or the DSN names another.
                click.echo(f"error: cannot reach the database: {message}; check that the server "
                           "is up and that the DSN names it ([source] dsn, [search] dsn)", err=True)
            else:
                click.echo(f"error: the database stopped the command: {message}{state}", err=True)
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
@click.option("--recopy", "recopy", multiple=True, metavar="SCHEMA.TABLE",
              help="Copy this configured table again (repeatable).")
@click.option("--forget", "forget", multiple=True, metavar="SCHEMA.TABLE",
              help="Tombstone the documents of a table no longer configured, and take it out "
                   "of the publication (repeatable).")
@_errors
def setup(config_path: str, recopy: tuple[str, ...], forget: tuple[str, ...]) -> None:
    """Create the publication, slot and search schema; copy existing rows. Idempotent.

    A table whose mapping changed in the configuration since its copy is copied again;
    --recopy copies a table again anyway (after changing a Python mapper's code)."""
    from .logs import configure_logging
    from .progress import terminal_progress

    configure_logging(json=False)
    worker = _worker(config_path)
    progress = terminal_progress(worker.estimate_rows)
    try:
        report = worker.setup(progress=progress, notice=click.echo, recopy=recopy, forget=forget)
    finally:
        progress.close()
        worker.close()
    click.echo(f"publication: {'created' if report.created_publication else 'present'}"
               + (f", added {', '.join(report.added_tables)}" if report.added_tables else "")
               + (", set to publish partitioned tables via their root" if report.via_partition_root else "")
               + (", set to publish stored generated columns" if report.generated_columns else ""))
    click.echo(f"slot: {'created' if report.created_slot else 'present'}")
    for table in report.replaced:
        click.echo(f"{table}: dropped and created again, or keyed by other columns, since its "
                   "copy; its documents were tombstoned and it is copied afresh")
    for table in report.resynced:
        click.echo(f"{table}: its changes went unrecorded for a while (the slot was made anew, "
                   "or the table was out of the publication): copied again, and rows deleted "
                   "meanwhile tombstoned")
    for table in report.remapped:
        click.echo(f"{table}: " + ("copied again, as asked" if table in recopy else
                                   "its mapping changed in the configuration since its copy")
                   + "; each row's documents are made again (only those that changed are written)")
    for table in report.forgotten:
        click.echo(f"{table}: forgotten: its documents are tombstoned (devices delete them too) "
                   "and it is out of the publication")
    for table in report.unconfigured:
        click.echo(f"{table}: no longer configured; its documents stay searchable. "
                   f"`slipstream setup --forget {table}` tombstones them")
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
            "ann_queue": st.ann_queue,
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
    click.echo(f"dead letters: {st.dead_letters:,}   pending embeddings: {st.pending_embeddings:,}"
               f"   awaiting HNSW: {st.ann_queue:,}")
    for t, n in st.dead_letters_by_table.items():
        click.echo(f"  dead letters in {t}: {n:,} (`slipstream deadletter list` shows them)")


@main.command()
@CONFIG
@click.option("--keep-index", is_flag=True,
              help="Keep the search schema (index, change log, worker state); drop only the "
                   "source's slot and publication.")
@click.option("--keep-publication", is_flag=True,
              help="Keep the publication (when other consumers use it).")
@click.option("--yes", is_flag=True, help="Drop without asking.")
@_errors
def teardown(config_path: str, keep_index: bool, keep_publication: bool, yes: bool) -> None:
    """Undo `setup`: drop the replication slot and the publication on the source, and
    the search schema. A slot nobody reads keeps WAL forever: run this when you stop
    using slipstream. Refuses, dropping nothing, while a worker streams from the slot."""
    from .config import load_config
    from .pgtypes import source_conninfo
    from .teardown import plan_teardown, run_teardown

    config = load_config(config_path)
    source_dsn = source_conninfo(config.source.resolve_dsn())
    search_dsn = config.search.resolve_dsn(config.source)
    plan = plan_teardown(source_dsn, search_dsn, slot=config.source.slot,
                         publication=config.source.publication, schema=config.search.schema,
                         keep_publication=keep_publication, keep_index=keep_index)
    for line in plan.describe():
        click.echo(line)
    if plan.empty:
        click.echo("nothing to drop")
        return
    if not yes:
        click.confirm("drop these?", abort=True)
    run_teardown(plan, source_dsn, search_dsn)
    click.echo("dropped: " + ", ".join(plan.dropped))


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
@CONFIG
@click.option("--space", required=True, help="The embedding space to re-embed.")
@click.option("--rate", type=float, default=None, help="At most this many texts a second.")
@click.option("--batch", type=int, default=256, show_default=True, help="Rows per step.")
@click.option("--switch-wait", type=float, default=None,
              help="Seconds to wait for the running worker to stop before the switch "
                   "(default: until it stops). Run again later to resume.")
@_errors
def reembed(config_path: str, space: str, rate: float | None, batch: int,
            switch_wait: float | None) -> None:
    """Re-embed SPACE with the configured embedder, beside the running worker; switch when done.

    Searches and devices keep the old vectors until the switch and get only the new ones
    after it. The switch needs the apply writer: stop the running worker when asked, then
    start it with the new configuration. Interrupted, it resumes where it stopped.
    """
    from .config import load_config
    from .reembed import run_reembed

    shown = {"phase": None, "at": 0.0}

    def show(p) -> None:
        now = time.monotonic()
        if p.phase != shown["phase"] or now - shown["at"] >= 2.0:
            pct = 100.0 * p.done / p.total if p.total else 100.0
            line = f"reembed {p.space}: {p.done:,}/{p.total:,} rows ({pct:.0f}%), {p.sent:,} texts sent"
            if p.phase == "waiting for the writer":
                line += " - shadow complete; stop the running worker to switch"
            elif p.phase in ("switched", "current"):
                line += f" - {p.phase}"
            if p.error:
                line += f" - last error: {p.error}"
            click.echo(line)
            shown.update(phase=p.phase, at=now)

    last = run_reembed(load_config(config_path), space, rate=rate, batch=batch,
                       switch_wait=switch_wait, progress=show)
    if last.phase == "switched":
        click.echo(f"space {space} now holds the new vectors; start the worker with this configuration")
    elif last.phase == "current":
        click.echo(f"space {space} already holds this embedder's vectors; nothing to do")
    else:
        click.echo("the worker is still running; the shadow stays; run this again to finish")
        sys.exit(3)


@main.command()
@click.option("--keep", is_flag=True, help="Leave the embedded Postgres running at the end.")
@_errors
def demo(keep: bool) -> None:
    """Run the end-to-end demo on an embedded Postgres (nothing to install)."""
    from .demo import run_demo

    run_demo(keep=keep)


# -- device sync ---------------------------------------------------------------------------

def _sync_retry(live: bool):
    from slipstream.shardsync.client import SyncRetryPolicy

    return SyncRetryPolicy(max_attempts=None if live else 8)


@main.command()
@CONFIG
@click.option("--host", default=None, help="Address to bind (default: [sync] listen).")
@click.option("--port", type=int, default=None, help="Port (default: [sync] port).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@_errors
def serve(config_path: str, host: str | None, port: int | None, log_level: str) -> None:
    """Serve device sync (snapshots, change pages, live long-poll) over HTTP until SIGTERM."""
    import uvicorn
    from slipstream.shardsync.server import ServerSettings, create_app
    from slipstream.shardsync.tokens import TokenVerifier

    from .config import load_config

    cfg = load_config(config_path)
    s = cfg.sync
    bind, listen_port = host or s.listen, port or s.port
    _check_free(bind, listen_port, "sync.port (or --port)", cfg.origin)
    if s.metrics_port:
        _check_free(bind, s.metrics_port, "sync.metrics_port", cfg.origin)
    settings = ServerSettings(
        dsn=cfg.search.resolve_dsn(cfg.source), schema=cfg.search.schema,
        verifier=TokenVerifier(s.token_key(), algorithm=s.algorithm, audience=s.audience,
                               leeway=s.token_leeway_seconds),
        spaces=s.spaces, snapshot_cache_bytes=s.snapshot_cache_mb << 20,
        metrics_host=bind, metrics_port=s.metrics_port)
    uvicorn.run(create_app(settings), host=bind, port=listen_port,
                log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)


def _check_free(host: str, port: int, path: str, source: str) -> None:
    """A clear error before starting, when `host:port` cannot be listened on (another
    process holds it, or the address is not this machine's)."""
    import socket

    from .tomlreader import ConfigError

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); free it "
                          "or choose another port", path=path, source=source) from exc


@main.group()
def token() -> None:
    """Device tokens: signed JWTs listing the partitions a device may read."""


@token.command("issue")
@CONFIG
@click.option("--partition", "partitions", multiple=True, required=True,
              help="A partition the token may read; repeat for several.")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime: 900, 15m, 1h, 7d.")
@click.option("--subject", default=None, help="The device or user the token is for (sub).")
@click.option("--private-key-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="PEM private key, for EdDSA/RS256 (the server holds the public key).")
@_errors
def token_issue(config_path: str, partitions: tuple[str, ...], ttl: str, subject: str | None,
                private_key_file: str | None) -> None:
    """Print a device token for the given partitions, signed as the [sync] section says."""
    from slipstream.shardsync.tokens import issue_token, read_key

    from .config import load_config

    s = load_config(config_path).sync
    if s.algorithm == "HS256":
        key: str | bytes = s.token_key()
    elif private_key_file is None:
        raise ConfigurationError(f"[sync] uses {s.algorithm}: pass --private-key-file with the "
                                 "private key matching public_key_file")
    else:
        key = read_key(private_key_file)
    click.echo(issue_token(key, partitions, ttl=ttl, algorithm=s.algorithm, audience=s.audience,
                           subject=subject))


@main.command()
@CONFIG
@click.option("--retention", default=None, help="Keep tombstones this long (e.g. 7d; default "
              "[worker] tombstone_retention_seconds).")
@_errors
def compact(config_path: str, retention: str | None) -> None:
    """Compact the change log: drop superseded entries and old tombstones, raise the horizon."""
    import psycopg
    from slipstream.shardsync.compact import compact as run_compact

    from .config import load_config

    cfg = load_config(config_path)
    kwargs = {"retention": cfg.worker.tombstone_retention_seconds}
    if retention is not None:
        from datetime import timedelta

        from slipstream.shardsync.tokens import parse_ttl

        kwargs["retention"] = timedelta(seconds=parse_ttl(retention, allow_zero=True))
    with psycopg.connect(cfg.search.resolve_dsn(cfg.source), autocommit=True) as conn:
        report = run_compact(conn, cfg.search.schema, **kwargs)
    click.echo(f"compacted in {report.seconds * 1000:.0f} ms: {report.superseded:,} superseded "
               f"entries, {report.tombstones:,} old tombstones, {report.docs_purged:,} tombstoned "
               f"rows purged; horizon {report.horizon:,}")


@main.group()
def shard() -> None:
    """A device shard: sync it from a `slipstream serve` and search it offline."""


@shard.command("sync")
@click.argument("url")
@click.option("--token", "token_", envvar="SLIPSTREAM_TOKEN", required=True,
              help="The device token (or $SLIPSTREAM_TOKEN).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="The shard file: created on the first run, updated after.")
@click.option("--partition", "partitions", multiple=True,
              help="Only these partitions (default: every one the token lists).")
@click.option("--spaces", default=None, help="Comma-separated embedding spaces to carry "
              "(default: the server's default; '' for none).")
@click.option("--live", is_flag=True, help="Keep following changes until interrupted.")
@click.option("--wait", default=25.0, show_default=True, help="Long-poll seconds in --live.")
@_errors
def shard_sync(url: str, token_: str, out: str, partitions: tuple[str, ...], spaces: str | None,
               live: bool, wait: float) -> None:
    """Download a snapshot (first run), then apply changes; --live follows them."""
    from slipstream.shardsync.client import SyncClient

    space_list = None if spaces is None else [s for s in spaces.split(",") if s]
    with SyncClient(url, token_, out, partitions=partitions or None, spaces=space_list,
                    retry=_sync_retry(live)) as client:
        def progress(entries: int, cursor: int) -> None:
            if live and entries:
                click.echo(f"applied {entries} change(s); cursor {cursor}")
        try:
            report = client.sync(live=live, wait=wait, on_page=progress)
        except KeyboardInterrupt:
            click.echo("stopped")
            return
    how = "snapshot + " if report.snapshot else "resynced + " if report.resynced else ""
    click.echo(f"{out}: {how}{report.entries} change(s) in {report.pages} page(s); "
               f"cursor {report.cursor}")


def _search_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options `search` and `shard search` share: the server's and the device's search."""
    for option in reversed([
            click.argument("query"),
            click.option("-k", "k", default=10, show_default=True),
            click.option("--partition", "partitions", multiple=True),
            click.option("--space", default=None),
            click.option("--mode", default="balanced", show_default=True,
                         type=click.Choice(["balanced", "precision", "explore"])),
            click.option("--object-type", "object_types", multiple=True),
            click.option("--node-kind", "node_kinds", multiple=True),
            click.option("--json", "as_json", is_flag=True)]):
        func = option(func)
    return func


def _search(index: Any, query: str, k: int, partitions: tuple[str, ...], space: str | None, mode: str,
            object_types: tuple[str, ...], node_kinds: tuple[str, ...], as_json: bool) -> None:
    results = index.search(query, k=k, partition=list(partitions) or None, space=space,
                           mode=mode, object_types=list(object_types) or None,
                           node_kinds=list(node_kinds) or None)
    if as_json:
        click.echo(json.dumps([{"object_type": r.object_type, "object_id": r.object_id,
                                "node_kind": r.node_kind, "partition": r.partition,
                                "title": r.title, "score": r.score, "match_type": r.match_type}
                               for r in results], indent=2))
        return
    for r in results:
        click.echo(f"{r.score:.4f} {r.match_type:<8} {r.object_type} {r.object_id}: {r.title}")
    if not results:
        click.echo("(no results)")


@main.command()
@CONFIG
@_search_options
@_errors
def search(config_path: str, **options: Any) -> None:
    """Search the server's index, as the application's `SearchIndex` does."""
    from slipstream.index import PostgresBackend, SearchIndex

    from .config import load_config
    from .embedders import build_embedders

    cfg = load_config(config_path)
    backend = PostgresBackend(cfg.search.resolve_dsn(cfg.source), schema=cfg.search.schema,
                              spaces=dict(cfg.spaces), exact_limit=cfg.search.exact_limit,
                              hnsw=cfg.search.hnsw)
    try:
        embedders = build_embedders(cfg.embedders)
        index = SearchIndex(backend, embedders, default_space=options["space"] or (
            next(iter(embedders)) if len(embedders) == 1 else None))
        _search(index, **options)
    finally:
        backend.close()


@shard.command("search")
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="A config whose [embedders] embed the query (default: lexical only).")
@_search_options
@_errors
def shard_search(path: str, config_path: str | None, **options: Any) -> None:
    """Search a shard file offline, ranked exactly as the server ranks."""
    from slipstream.index import SearchIndex
    from slipstream.shardsync.shard import open_shard

    backend = open_shard(path)
    try:
        embedders = {}
        if config_path is not None:
            from .config import load_config
            from .embedders import build_embedders

            cfg = load_config(config_path)
            embedders = build_embedders({s: e for s, e in cfg.embedders.items()
                                         if s in backend.spaces})
        space = options["space"]
        index = SearchIndex(backend, embedders, default_space=space if space else (
            next(iter(embedders)) if len(embedders) == 1 else None))
        _search(index, **options)
    finally:
        backend.close()
