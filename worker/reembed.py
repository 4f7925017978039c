"""`slipstream reembed --space S`: move a space to a new embedder with no downtime and no mix.

A space's vectors come from one embedder, recorded per space; a worker configured with
another refuses to start. Re-embedding runs beside the worker that still streams with
the old configuration:

1. `begin_reembed` adds a shadow column for the space and records the new embedder as
   the space's next one (a second run with the same configuration resumes);
2. the fill loop embeds, oldest rows first, every row whose shadow vector is missing or
   embeds stale text — through the content-hash cache and the configured client, so
   batching, concurrency, retries and the circuit breaker apply — at most `rate` texts
   a second, reporting progress; rows the old worker rewrites meanwhile are picked up
   again;
3. the switch needs the apply writer: the loop keeps the shadow caught up until it can
   take the writer lock (stop the running worker), catches up the last rows, and in one
   transaction swaps the shadow column in, records the new embedder and appends a
   change-log entry for every row of the space, so devices fetch the new vectors.

Searches read the old column until that transaction commits and the new one after:
never a mix. Then start the worker with the new configuration.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from slipstream.index import IndexDoc, PostgresBackend, SearchIndex
from slipstream.index.embedding import embedder_id, text_hash
from slipstream.index.errors import ConfigurationError

from .config import WorkerConfig
from .embedders import build_embedders
from .state import ChangeEntry, Checkpoint, WorkerState


@dataclass(frozen=True, slots=True)
class Progress:
    space: str
    done: int
    total: int
    sent: int  # texts embedded by this run
    phase: str  # "filling", "waiting for the writer", "switched", "current"
    error: str | None = None


class RateLimit:
    """At most `per_second` texts a second, on average (None: no limit)."""

    def __init__(self, per_second: float | None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.per_second, self.sleep = per_second, sleep
        self.started, self.used = time.monotonic(), 0

    def take(self, n: int) -> None:
        if not self.per_second:
            return
        self.used += n
        ahead = self.used / self.per_second - (time.monotonic() - self.started)
        if ahead > 0:
            self.sleep(ahead)


def reembed_space(backend: PostgresBackend, index: SearchIndex, state: WorkerState, slot: str,
                  space: str, *, batch: int = 256, rate: float | None = None,
                  switch_wait: float | None = None, idle_sleep: float = 1.0,
                  progress: Callable[[Progress], None] | None = None,
                  sleep: Callable[[float], None] = time.sleep) -> Progress:
    """Fill the shadow column of `space` with `index.embedders[space]` and switch when done.

    `switch_wait`: how long to wait for the apply writer (None: until it is free). Returns
    the last progress; phase "switched" when the space now holds the new vectors.
    """
    report = progress or (lambda p: None)
    eid = embedder_id(index.embedders[space])
    if not backend.begin_reembed(space, eid):
        last = Progress(space, *backend.shadow_progress(space), 0, "current")
        report(last)
        return last
    limiter = RateLimit(rate, sleep)
    sent = 0
    last_error: str | None = None

    def fill_pass() -> int:
        """One pass over the rows not done; returns how many were filled."""
        nonlocal sent, last_error
        filled, after = 0, 0
        while True:
            rows = backend.shadow_todo(space, batch, after)
            if not rows:
                return filled
            after = rows[-1][0]
            texts = [_embed_text(title, body) for _, _, title, body in rows]
            limiter.take(len(texts))
            got, error = index.embed_texts(space, texts)
            sent += len(texts)
            if error:
                last_error = error
            backend.set_shadow(space, [(rows[j][1], got[j], text_hash(texts[j])) for j in got])
            filled += len(got)
            report(Progress(space, *backend.shadow_progress(space), sent, "filling", last_error))

    failures = 0
    while True:  # fill until a pass finds nothing to do
        done, total = backend.shadow_progress(space)
        if done == total:
            break
        if fill_pass() == 0:  # nothing could be embedded: the service is down; wait and retry
            failures += 1
            sleep(min(60.0, idle_sleep * 2 ** min(failures, 6)))
        else:
            failures = 0
    backend.index_shadow(space)
    waited_from = time.monotonic()
    told = False
    with backend.connect() as conn:  # the writer lock is this session's; closing releases it
        while True:
            try:
                state.claim_writer(conn, slot, wait_seconds=0)
                conn.commit()
                break
            except ConfigurationError:
                conn.rollback()
            if switch_wait is not None and time.monotonic() - waited_from >= switch_wait:
                last = Progress(space, *backend.shadow_progress(space), sent,
                                "waiting for the writer", last_error)
                report(last)
                return last
            if not told:
                report(Progress(space, *backend.shadow_progress(space), sent,
                                "waiting for the writer", last_error))
                told = True
            fill_pass()  # the running worker keeps writing: stay caught up
            sleep(idle_sleep)
        while True:  # the writer is ours: nothing changes any more; finish the last rows
            done, total = backend.shadow_progress(space)
            if done == total:
                break
            if fill_pass() == 0:
                raise ConfigurationError(
                    f"{total - done} rows of space {space!r} could not be re-embedded "
                    f"({last_error}); fix the embedding service and run "
                    f"`slipstream reembed --space {space}` again (it resumes)")
        _switch(backend, state, slot, space, conn)
    last = Progress(space, *backend.shadow_progress(space), sent, "switched", last_error)
    report(last)
    return last


def _switch(backend: PostgresBackend, state: WorkerState, slot: str, space: str,
            conn: psycopg.Connection) -> None:
    def log(rows: list[tuple[str, tuple[str, str, str]]]) -> None:
        cp = state.checkpoint(conn, slot)
        entries = [ChangeEntry(partition, *key, "u", cp.lsn) for partition, key in rows]
        state.changelog.append(conn, entries, first_seq=cp.last_seq + 1)
        state.save_checkpoint(conn, slot, Checkpoint(cp.lsn, cp.partial_lsn, cp.partial_offset,
                                                     cp.last_seq + len(entries)))

    with conn.transaction():
        backend.switch_space(space, conn, log)


def _embed_text(title: str, body: str) -> str:
    return IndexDoc("row", "row", title=title, body=body).embed_text()


def run_reembed(config: WorkerConfig, space: str, *, rate: float | None = None,
                batch: int = 256, switch_wait: float | None = None,
                progress: Callable[[Progress], None] | None = None) -> Progress:
    """`slipstream reembed`: build the pieces from the (new) configuration and run."""
    if space not in config.spaces:
        raise ConfigurationError(f"--space {space!r} is not in [spaces] ({', '.join(config.spaces)})")
    search_dsn = config.search.resolve_dsn(config.source)
    backend = PostgresBackend(search_dsn, schema=config.search.schema, spaces=dict(config.spaces),
                              exact_limit=config.search.exact_limit, hnsw=config.search.hnsw,
                              cache_max_rows=config.embed_cache_rows())
    try:
        embedders = build_embedders({space: config.embedders[space]})
        index = SearchIndex(backend, embedders, check_embedders=False)
        state = WorkerState(config.search.schema)
        with psycopg.connect(search_dsn) as conn:
            state.migrate(conn)
        return reembed_space(backend, index, state, config.source.slot, space, batch=batch,
                             rate=rate, switch_wait=switch_wait, progress=progress)
    finally:
        backend.close()
