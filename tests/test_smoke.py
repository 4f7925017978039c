"""The harness itself: the session server is real Postgres with logical replication and pgvector."""

import psycopg


def test_server_has_logical_wal_and_pgvector(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        ext = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        assert ext is not None
        slots = int(conn.execute("SHOW max_replication_slots").fetchone()[0])
        assert slots >= 10
