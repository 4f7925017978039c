"""A small stand-in for the worker's apply transaction, for the change-log and shard tests.

`LogWriter` writes search rows through `PostgresBackend` and the change-log entries the
worker would record for them (a ``d`` in the old partition when a row moves), in one
transaction, so tests can build any history quickly and deterministically.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
from slipstream.index import HashingEmbedder, IndexDoc, PostgresBackend, SearchIndex
from slipstream.index.doc import DocKey
from slipstream.shardsync.changelog import ChangeEntry, ChangeLog

DIM = 16
SPACES = {"local": DIM, "server": 24}


class LogWriter:
    """Writes docs and their change-log entries like the worker's apply step."""

    def __init__(self, dsn: str, schema: str = "slipstream", spaces: dict[str, int] | None = None,
                 hnsw: bool = False) -> None:
        spaces = dict(spaces or SPACES)
        self.dsn, self.schema = dsn, schema
        self.backend = PostgresBackend(dsn, schema=schema, spaces=spaces, hnsw=hnsw)
        self.index = SearchIndex(self.backend, {s: HashingEmbedder(d) for s, d in spaces.items()})
        self.log = ChangeLog(schema)
        self.conn = self.backend.connect()
        self.log.migrate(self.conn)
        self.lsn = 0x100

    def close(self) -> None:
        self.conn.close()
        self.backend.close()

    def apply(self, upserts: Sequence[IndexDoc] = (), deletes: Sequence[DocKey] = ()) -> int:
        """Upsert and delete in one transaction; returns the last seq."""
        self.lsn += 8
        prepared = self.index.prepare(list(upserts))
        keys = [d.key for d in upserts] + list(deletes)
        with self.conn.transaction():
            current = {}
            if keys:
                cols = list(zip(*keys))
                current = {(r[0], r[1], r[2]): (r[3], r[4]) for r in self.conn.execute(
                    f"SELECT object_type, object_id, node_kind, partition, deleted FROM {self.schema}.docs "
                    "WHERE (object_type, object_id, node_kind) IN "
                    "(SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]))",
                    [list(cols[0]), list(cols[1]), list(cols[2])])}
            entries = []
            for d in upserts:
                old = current.get(d.key)
                if old is not None and not old[1] and old[0] != d.partition:
                    entries.append(ChangeEntry(old[0], *d.key, "d", self.lsn))
                entries.append(ChangeEntry(d.partition, *d.key, "u", self.lsn))
            for key in deletes:
                old = current.get(key)
                if old is not None and not old[1]:
                    entries.append(ChangeEntry(old[0], *key, "d", self.lsn))
            self.backend.write(prepared, conn=self.conn)
            self.backend.tombstone_many(list(deletes), conn=self.conn)
            return self.log.append(self.conn, entries)


def doc(object_id: str, partition: str = "A", text: str = "", node_kind: str = "leaf",
        object_type: str = "note", **kw) -> IndexDoc:
    return IndexDoc(object_type, object_id, node_kind, title=f"title {object_id} {text}".strip(),
                    body=kw.pop("body", f"body of {object_id} {text}"), partition=partition, **kw)


def query(dsn: str, text: str, params: Sequence = ()) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(text, params).fetchall()
