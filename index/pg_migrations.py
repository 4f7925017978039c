"""Versioned, idempotent schema migrations for the Postgres side, shared by index and worker.

A migration is (version, name, script); `{s}` in a script is the schema. Applied
versions are recorded in a table of the caller's choosing, all inside the caller's
transaction, under an advisory lock per schema so concurrent starters take turns.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
from psycopg import sql

Migration = tuple[int, str, str]


def apply_migrations(conn: psycopg.Connection, schema: str, table: str,
                     migrations: Sequence[Migration]) -> list[int]:
    """Apply the migrations not yet recorded in `schema.table`; returns the versions applied.

    Call inside a transaction.
    """
    s, t = sql.Identifier(schema), sql.Identifier(table)
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"slipstream:{schema}",))
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {s}").format(s=s))
    conn.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {s}.{t} (version integer PRIMARY KEY, name text NOT NULL, "
        "applied_at timestamptz NOT NULL DEFAULT now())").format(s=s, t=t))
    done = {v for (v,) in conn.execute(sql.SQL("SELECT version FROM {s}.{t}").format(s=s, t=t))}
    applied = []
    for version, name, script in migrations:
        if version in done:
            continue
        for statement in filter(str.strip, script.split(";\n")):
            conn.execute(sql.SQL(statement).format(s=s))
        conn.execute(sql.SQL("INSERT INTO {s}.{t} (version, name) VALUES (%s, %s)").format(s=s, t=t),
                     (version, name))
        applied.append(version)
    return applied
