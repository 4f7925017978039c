"""Who a replication slot's creation waits for, reported while it waits.

A new logical slot must see every transaction from its beginning, so
`CREATE_REPLICATION_SLOT` waits until every transaction that was open when it
started (and wrote anything) has ended. One forgotten `BEGIN` in a psql session, or
an application holding a transaction open, makes `setup` wait with no end in sight.
`BlockerReport` watches the walsender's `pg_blocking_pids` from a connection of its
own and tells `notice` which sessions it waits for, when they change and once a
minute, so the user can end them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

import psycopg

__all__ = ["BlockerReport", "describe_blockers"]

_QUERY = """
SELECT a.pid, coalesce(a.state, ''), coalesce(a.usename, ''), coalesce(a.application_name, ''),
       extract(epoch FROM now() - a.xact_start)::int, left(regexp_replace(coalesce(a.query, ''),
       '\\s+', ' ', 'g'), 80)
FROM pg_stat_activity a WHERE a.pid = ANY(pg_blocking_pids(%s)) ORDER BY a.xact_start, a.pid
"""


def describe_blockers(rows: list[tuple]) -> str:
    """One line naming the sessions a slot's creation waits for and how to end them."""
    sessions = "; ".join(
        f"pid {pid} ({', '.join(x for x in (f'user {user}' if user else '', f'app {app}' if app else '', state) if x)}"
        f", open {age if age is not None else '?'} s): {query}"
        for pid, state, user, app, age, query in rows)
    n = len(rows)
    return (f"slot: waiting for {n} transaction{'s' if n != 1 else ''} open on the server to end "
            f"(a new slot must see every transaction from its start): {sessions}. Commit or roll "
            f"{'them' if n != 1 else 'it'} back; SELECT pg_terminate_backend(pid) ends a session by force")


class BlockerReport:
    """While open, reports the sessions blocking backend `pid` (see the module docstring)."""

    def __init__(self, dsn: str, pid: int, notice: Callable[[str], None], *,
                 first: float = 2.0, every: float = 2.0, repeat: float = 60.0) -> None:
        self.dsn, self.pid, self.notice = dsn, pid, notice
        self.first, self.every, self.repeat = first, every, repeat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="slot-blockers", daemon=True)

    def __enter__(self) -> BlockerReport:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        if self._stop.wait(self.first):
            return
        shown: tuple[int, ...] = ()
        last = 0.0
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                while not self._stop.is_set():
                    rows = conn.execute(_QUERY, (self.pid,)).fetchall()
                    pids = tuple(r[0] for r in rows)
                    now = time.monotonic()
                    if rows and (pids != shown or now - last >= self.repeat):
                        self.notice(describe_blockers(rows))
                        shown, last = pids, now
                    if self._stop.wait(self.every):
                        return
        except psycopg.Error:
            return  # a report is a nicety: the slot's creation goes on without it
