"""A fresh database with pgvector on the benchmarks' embedded Postgres."""

from __future__ import annotations

import psycopg


def make_db(server, name: str, ddl: str = "") -> str:
    """Drop and create database `name` with the vector extension, run `ddl`; its DSN."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    dsn = server.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        if ddl:
            conn.execute(ddl)
    return dsn
