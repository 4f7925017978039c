"""The search table's schema in Postgres, as versioned migrations (`pg_migrations`):
``spaces`` and ``docs`` with their indexes, term counts kept inline, the embedding
reuse columns and cache, and the HNSW queue (`pg_ann`). `PostgresBackend.create_schema`
applies them, then adds a vector column per space and, with HNSW, its side table.
"""

from __future__ import annotations

from .pg_ann import ANN_QUEUE_DDL

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "search table", """
CREATE TABLE {s}.spaces (name text PRIMARY KEY, dim integer NOT NULL);
CREATE TABLE {s}.docs (
    id bigserial PRIMARY KEY,
    object_type text NOT NULL,
    object_id text NOT NULL,
    node_kind text NOT NULL,
    partition text NOT NULL,
    title text NOT NULL DEFAULT '',
    body text NOT NULL DEFAULT '',
    keywords jsonb NOT NULL DEFAULT '[]',
    payload jsonb NOT NULL DEFAULT '{{}}',
    attrs jsonb NOT NULL DEFAULT '{{}}',
    source_updated_at timestamptz,
    tf jsonb NOT NULL DEFAULT '{{}}',
    tsv tsvector NOT NULL DEFAULT '',
    len_title integer NOT NULL DEFAULT 0,
    len_body integer NOT NULL DEFAULT 0,
    deleted boolean NOT NULL DEFAULT false,
    pending_spaces text[] NOT NULL DEFAULT '{{}}',
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (object_type, object_id, node_kind)
);
CREATE INDEX docs_tsv ON {s}.docs USING gin (tsv);
CREATE INDEX docs_scope ON {s}.docs (partition) INCLUDE (len_title, len_body) WHERE NOT deleted;
CREATE INDEX docs_attrs ON {s}.docs USING gin (attrs jsonb_path_ops);
"""),
    # Keep term counts in the row: every lexical query reads them, and out-of-line (TOAST)
    # storage costs a lookup per row.
    (2, "term counts stored inline", """
ALTER TABLE {s}.docs ALTER COLUMN tf SET STORAGE MAIN;
"""),
    # Re-embed only what changed: per row, a fingerprint of what devices see and the hash
    # of the text embedded per space; the last embedding error of a pending row; the
    # embedder each space was filled with; a content-hash cache of vectors.
    (3, "embedding reuse", """
ALTER TABLE {s}.docs ADD COLUMN doc_hash text,
    ADD COLUMN embed_hashes jsonb NOT NULL DEFAULT '{{}}',
    ADD COLUMN pending_error text,
    ADD COLUMN pending_tried_at timestamptz;
ALTER TABLE {s}.spaces ADD COLUMN embedder text, ADD COLUMN next_embedder text;
CREATE TABLE {s}.embed_cache (
    space text NOT NULL,
    embedder text NOT NULL,
    text_hash text NOT NULL,
    vector bytea NOT NULL,
    used_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (space, embedder, text_hash)
);
CREATE INDEX embed_cache_lru ON {s}.embed_cache (space, used_at);
CREATE INDEX docs_pending ON {s}.docs (pending_tried_at NULLS FIRST, id)
    WHERE pending_spaces <> '{{}}' AND NOT deleted;
"""),
    # HNSW indexes move to side tables kept up to date from a queue (`pg_ann`): an HNSW
    # insert costs milliseconds of the server's time, too much for the write path.
    (4, "approximate index off the write path", ANN_QUEUE_DDL),
]
