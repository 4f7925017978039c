"""Notices, while the worker runs, a configured table replaced, keyed anew under its name,
or taken out of the publication.

A publication holds tables, not names. After a bulk reload swaps a new table in
(create it, fill it, drop the old one, rename the new one into its place), the new
table's changes are not published, and nothing in the stream says so. A new primary
key (or replica identity index) gives every row another key, so the documents made
under the old one would never be matched again. `TableWatch` reads each configured
table's OID and key columns every `interval` seconds, on a connection of its own,
and calls `on_replaced(tables)` once when any differs from what the worker resolved
at its start. A table that is gone, with nothing under its name yet, or that has no
key for the moment (between dropping one key and adding the next), is logged and
watched on. A table taken out of the publication (by hand, or the publication
dropped) has its changes no longer sent, with nothing in the stream to say so either.
The worker then stops its stream, runs `setup` again (which tombstones the old
documents, puts the table back in the publication and queues the copy that catches it
up, `setup.mark_resync`) and streams on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg
from slipstream.index.errors import ConfigurationError

from .publication import published
from .snapshot import split_relation, table_shape

__all__ = ["TableWatch"]

_OIDS = """
SELECT t.i, c.oid::int FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS t(s, n, i)
LEFT JOIN pg_namespace ns ON ns.nspname = t.s
LEFT JOIN pg_class c ON c.relnamespace = ns.oid AND c.relname = t.n AND c.relkind IN ('r', 'p')
ORDER BY t.i
"""


class TableWatch:
    """Watches `oids` ({table: OID}) on `dsn`; see the module docstring."""

    def __init__(self, dsn: str, oids: Mapping[str, int], on_replaced: Callable[[list[str]], None],
                 *, keys: Mapping[str, Sequence[str]] | None = None, interval: float = 5.0,
                 publication: str | None = None, log: Any = None) -> None:
        self.dsn, self.oids, self.on_replaced = dsn, dict(oids), on_replaced
        self.publication = publication
        self.keys = {table: tuple(cols) for table, cols in (keys or {}).items()}
        self.interval, self.log = interval, log
        self._gone: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="table-watch", daemon=True)

    def start(self) -> TableWatch:
        if self.oids:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def check(self, conn: psycopg.Connection) -> list[str]:
        """The tables now under another OID, or keyed by other columns, than the worker
        resolved, or out of its publication."""
        tables = list(self.oids)
        parts = [split_relation(t) for t in tables]
        rows = conn.execute(_OIDS, ([s for s, _ in parts], [n for _, n in parts])).fetchall()
        members = published(conn, self.publication) if self.publication is not None else None
        replaced = []
        for table, (_, oid) in zip(tables, rows, strict=True):
            if oid is None:
                if table not in self._gone and self.log is not None:
                    self.log.warning("table_gone", table=table, hint="its documents stay until a "
                                     "table of that name is created again or its section is removed")
                self._gone.add(table)
            elif oid != self.oids[table] or self._rekeyed(conn, table):
                replaced.append(table)
            elif members is not None and table not in members:
                if self.log is not None:
                    self.log.warning("table_unpublished", table=table, publication=self.publication)
                replaced.append(table)
        return replaced

    def _rekeyed(self, conn: psycopg.Connection, table: str) -> bool:
        if table not in self.keys:
            return False
        try:
            key = table_shape(conn, table, aliases={}).key
        except ConfigurationError as exc:  # no key for the moment: look again next time
            if self.log is not None:
                self.log.warning("table_key_unreadable", table=table, error=str(exc)[:300])
            return False
        return key != self.keys[table]

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                    replaced = self.check(conn)
            except psycopg.Error as exc:  # the stream's own loop reports connection trouble
                if self.log is not None:
                    self.log.warning("table_watch_failed", error=f"{type(exc).__name__}: {exc}"[:300])
                continue
            if replaced:
                self.on_replaced(replaced)
                return
