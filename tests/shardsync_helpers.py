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
from slipstream.shardsync.reader import changes_since
from slipstream.shardsync.shard import apply_page, shard_cursor

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


VOCAB = ["apple", "banana", "cherry", "grocery", "shopping", "list", "meeting", "notes", "quantum",
         "plan", "quarterly", "report", "invoice", "refund", "customer", "travel", "paris", "flight"]
QUERIES = ["apple banana", "quarterly report", "paris flight travel", "customer refund",
           "grocery shopping list", "quantum", "meeting notes plan", "cherry"]


def random_doc(rng, object_id: str, partitions: Sequence[str]) -> IndexDoc:
    words = lambda n: " ".join(rng.choice(VOCAB) for _ in range(rng.randint(0, n)))
    return IndexDoc(rng.choice(["note", "task"]), object_id, rng.choice(["leaf", "leaf", "chunk"]),
                    title=words(4), body=words(12), keywords=[rng.choice(VOCAB)] if rng.random() < .3 else [],
                    partition=rng.choice(list(partitions)), attrs={"color": rng.choice(["red", "blue"])},
                    payload={"n": rng.randint(0, 9)})


def server_rows(dsn: str, partitions: Sequence[str], spaces: Sequence[str],
                schema: str = "slipstream") -> dict:
    """The live rows of `partitions` on the server, in a comparable form."""
    from slipstream.shardsync.reader import register_vector_bytes

    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor(binary=True) as cur:
        register_vector_bytes(conn, cur)
        vecs = "".join(f", emb_{s}" for s in spaces)
        cur.execute(f"SELECT object_type, object_id, node_kind, partition, title, body, keywords, "
                    f"payload, attrs, tf, len_title, len_body{vecs} FROM {schema}.docs "
                    "WHERE partition = ANY(%s) AND NOT deleted", (list(partitions),))
        return {(r[0], r[1], r[2]): (r[3], r[4], r[5], list(r[6]), r[7], r[8], r[9], r[10], r[11],
                                     {s: v for s, v in zip(spaces, r[12:]) if v is not None})
                for r in cur.fetchall()}


def shard_rows(backend) -> dict:
    """The live rows of a SQLite shard, in the same form; checks the FTS rows on the way."""
    import json

    from slipstream.index.sqlite_backend import fts_token

    c = backend.connection
    out = {}
    for r in c.execute("SELECT id, object_type, object_id, node_kind, partition, title, body, "
                       "keywords, payload, attrs, tf, len_title, len_body FROM docs WHERE deleted = 0"):
        vectors = {s: bytes(v) for s, v in c.execute(
            "SELECT space, vec FROM vectors WHERE doc_id = ?", (r[0],))}
        tf = json.loads(r[10])
        fts = c.execute("SELECT terms FROM docs_fts WHERE rowid = ?", (r[0],)).fetchone()
        assert (sorted(fts[0].split()) if fts else []) == sorted(fts_token(t) for t in tf)
        out[(r[1], r[2], r[3])] = (r[4], r[5], r[6], json.loads(r[7]), json.loads(r[8]),
                                   json.loads(r[9]), tf, r[11], r[12], vectors)
    # Tombstones keep nothing: no FTS row, no vectors.
    (dead,) = c.execute("SELECT count(*) FROM docs d WHERE deleted = 1 AND (EXISTS (SELECT 1 FROM "
                        "vectors v WHERE v.doc_id = d.id) OR EXISTS (SELECT 1 FROM docs_fts f "
                        "WHERE f.rowid = d.id))").fetchone()
    assert dead == 0
    return out


def summary(results) -> list[tuple]:
    return [(r.key, r.match_type, r.lexical_rank, r.semantic_rank, r.matched_node_kinds,
             r.partition, r.payload, r.attrs, r.score, r.lexical_score, r.semantic_score)
            for r in results]


def assert_same_search(server: SearchIndex, shard: SearchIndex, partition: str | Sequence[str],
                       space: str = "local") -> int:
    """Every query (with and without filters) ranks identically on both; returns how many
    results were compared."""
    compared = 0
    for text in QUERIES:
        for options in ({}, {"object_types": ["note"]}, {"attrs": {"color": "red"}},
                        {"collapse": True, "k": 5}, {"mode": "precision", "k": 3}):
            on_server = server.search(text, partition=partition, space=space, **options)
            on_device = shard.search(text, partition=partition, space=space, **options)
            assert summary(on_server) == summary(on_device), (text, options)
            compared += len(on_server)
    return compared


def pull(shard, conn: psycopg.Connection, partitions: Sequence[str], limit: int) -> int:
    """Apply pages of `partitions` (space `local`) until the shard is current; returns how many."""
    pages = 0
    while True:
        page = changes_since(conn, "slipstream", list(partitions), shard_cursor(shard), limit,
                             ["local"])
        apply_page(shard, page)
        pages += 1
        if not page.has_more:
            return pages
