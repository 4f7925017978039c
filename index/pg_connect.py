"""The session settings pinned on every connection slipstream opens to Postgres.

A database or role may set any output style (`ALTER DATABASE app SET DateStyle =
'SQL, DMY'`), and every new session then reads values in it. psycopg parses dates,
timestamps and intervals sent as text only in the ISO `DateStyle` and the
`postgres` `IntervalStyle`, so a search database set otherwise would fail every
read of a `timestamptz`. `pinned_conninfo` adds the settings to a DSN's libpq
`options`, after the DSN's own: a later `-c` wins, and the rest are kept.

`NO_TIMEOUTS` lifts the time limits an application sets for its own sessions
(`ALTER DATABASE app SET idle_in_transaction_session_timeout = '30s'`) from the
processes that run slipstream's long work: the initial copy reads every table
inside one exported snapshot, idle between chunks while it indexes them, and a
partition's export is one long statement. pg_dump lifts the same ones.

A connection lost without a word (a NAT or load balancer dropping an idle one, a
host gone) is noticed within about a minute: TCP keepalives start after 30 idle
seconds (they also keep such middleboxes from dropping it), and data left
unacknowledged for 60 seconds ends it, where the operating system's defaults wait
two hours and a quarter of an hour. A DSN that sets any of these keeps its own.

Text travels as UTF-8 whatever the database's encoding (`client_encoding=UTF8`):
the server converts a LATIN1 or WIN1252 source's values, and psycopg would
otherwise return `bytes` for every text value of a `SQL_ASCII` database and encode
JSON as UTF-8 into a connection that expects another encoding.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["NO_TIMEOUTS", "SESSION_SETTINGS", "pinned_conninfo"]

_SETTING = re.compile(r"(?:-c\s*|--)([A-Za-z_.]+)=(\S+)")
SESSION_SETTINGS: tuple[tuple[str, str], ...] = (("DateStyle", "ISO"), ("IntervalStyle", "postgres"))
NO_TIMEOUTS: tuple[tuple[str, str], ...] = (
    ("statement_timeout", "0"), ("lock_timeout", "0"), ("idle_in_transaction_session_timeout", "0"))


_LIVENESS = (("keepalives", "1"), ("keepalives_idle", "30"), ("keepalives_interval", "10"),
             ("keepalives_count", "3"), ("tcp_user_timeout", "60000"))


def pinned_conninfo(dsn: str, settings: Sequence[tuple[str, str]] = SESSION_SETTINGS) -> str:
    """`dsn` with `settings` pinned in its libpq `options`, after any it has, UTF-8 as its
    `client_encoding` (replacing any the DSN names), and TCP liveness checks (unless the
    DSN sets its own).

    Raises `psycopg.ProgrammingError` for a DSN libpq cannot parse.
    """
    params = conninfo_to_dict(dsn)
    # A DSN's `options` replaces PGOPTIONS in libpq; keep what the environment asked for.
    own = params.get("options") or os.environ.get("PGOPTIONS") or ""
    now = {name.lower(): value for name, value in _SETTING.findall(own)}  # the last one wins
    pinned = " ".join(f"-c {name}={value}" for name, value in settings if now.get(name.lower()) != value)
    if pinned:  # pinning twice (a DSN pinned already) adds nothing
        params["options"] = f"{own} {pinned}" if own else pinned
    params["client_encoding"] = "UTF8"
    for name, value in _LIVENESS:
        params.setdefault(name, value)
    return make_conninfo("", **params)
