"""The search table's write statements, composed once per set of spaces and kept as query bytes.

`PostgresBackend.write` (the statement path, and the staged binary COPY of large
batches) and `PostgresBackend.write_statements` (the rows of a transaction sent as one
query with client-side parameters) use these; composing them per batch was a
measurable share of a small batch's cost. `vector_text` writes a float32 vector as
pgvector's text input, exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from psycopg import sql


@dataclass(frozen=True, slots=True)
class WriteSQL:
    """The upsert of search rows for one set of spaces, as query bytes."""

    upsert: bytes
    upsert_head: bytes  # `upsert` in three parts, for a multi-row VALUES list
    text_row: bytes  # one row of it, vectors given as text
    upsert_tail: bytes
    stage: bytes
    copy: bytes
    types: tuple[str, ...]
    upsert_staged: bytes
    truncate_stage: bytes


def write_sql(schema: str, dims: Mapping[str, int], spaces: tuple[str, ...]) -> WriteSQL:
    """The statements for rows of `schema`.docs with one vector column per space."""
    schema_id = sql.Identifier(schema)
    emb_cols = [sql.Identifier(f"emb_{s}") for s in spaces]
    columns = sql.SQL(", ").join([
        sql.Identifier(c) for c in (
            "object_type", "object_id", "node_kind", "partition", "title", "body", "keywords",
            "payload", "attrs", "source_updated_at", "tf", "tsv", "len_title", "len_body",
            "pending_spaces", "doc_hash", "embed_hashes", "pending_error")
    ] + emb_cols)
    values = sql.SQL(", ").join(
        [sql.Placeholder()] * 11 + [sql.SQL("array_to_tsvector(%s::text[])")]
        + [sql.Placeholder()] * (6 + len(spaces)))
    text_values = sql.SQL(", ").join(
        [sql.Placeholder()] * 11 + [sql.SQL("array_to_tsvector(%s::text[])")]
        + [sql.Placeholder()] * 6 + [sql.SQL("%s::vector")] * len(spaces))
    # Same text as stored (and not pending): keep the stored vector; nothing was sent.
    keeps = [sql.SQL(
        "{c} = CASE WHEN excluded.{c} IS NULL AND NOT cur.deleted "
        "AND NOT ({n} = ANY(excluded.pending_spaces)) "
        "AND excluded.embed_hashes ->> {n} = cur.embed_hashes ->> {n} "
        "THEN cur.{c} ELSE excluded.{c} END").format(
            c=sql.Identifier(f"emb_{sp}"), n=sql.Literal(sp)) for sp in spaces]
    updates = sql.SQL(", ").join([
        sql.SQL("{c} = excluded.{c}").format(c=sql.Identifier(c)) for c in (
            "partition", "title", "body", "keywords", "payload", "attrs", "source_updated_at",
            "tf", "tsv", "len_title", "len_body", "pending_spaces", "doc_hash", "embed_hashes",
            "pending_error")] + [sql.SQL("pending_tried_at = NULL")] + keeps)
    stage = sql.Identifier(f"slipstream_stage3_{schema}")
    head = sql.SQL("INSERT INTO {s}.docs AS cur ({columns}) VALUES ").format(
        s=schema_id, columns=columns).as_bytes(None)
    tail = sql.SQL(
        " ON CONFLICT (object_type, object_id, node_kind) DO UPDATE SET {updates}, "
        "deleted = false, updated_at = now()").format(updates=updates).as_bytes(None)
    out = WriteSQL(
        upsert=head + b"(" + values.as_bytes(None) + b")" + tail,
        upsert_head=head,
        text_row=b"(" + text_values.as_bytes(None) + b")",
        upsert_tail=tail,
        stage=sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {t} (object_type text, object_id text, "
            "node_kind text, partition text, title text, body text, keywords jsonb, "
            "payload jsonb, attrs jsonb, source_updated_at timestamptz, tf jsonb, "
            "len_title int, len_body int, pending_spaces text[], "
            "doc_hash text, embed_hashes jsonb, pending_error text{vecs}) "
            "ON COMMIT DELETE ROWS").format(t=stage, vecs=sql.SQL("").join(
                sql.SQL(", {c} vector({d})").format(c=sql.Identifier(f"emb_{sp}"),
                                                    d=sql.Literal(dims[sp]))
                for sp in spaces)).as_bytes(None),
        copy=sql.SQL("COPY {t} FROM STDIN (FORMAT BINARY)").format(t=stage).as_bytes(None),
        types=tuple(["text"] * 6 + ["jsonb"] * 3 + [
            "timestamptz", "jsonb", "int4", "int4", "text[]", "text", "jsonb", "text"
        ] + ["vector"] * len(spaces)),
        upsert_staged=sql.SQL(
            "INSERT INTO {s}.docs AS cur ({columns}) SELECT object_type, object_id, node_kind, "
            "partition, title, body, keywords, payload, attrs, source_updated_at, tf, "
            "array_to_tsvector(ARRAY(SELECT jsonb_object_keys(tf))), len_title, len_body, "
            "pending_spaces, doc_hash, "
            "embed_hashes, pending_error{vecs} FROM {t} "
            "ON CONFLICT (object_type, object_id, node_kind) DO UPDATE SET {updates}, "
            "deleted = false, updated_at = now()").format(
                s=schema_id, columns=columns, t=stage, updates=updates,
                vecs=sql.SQL("").join(sql.SQL(", ") + col for col in emb_cols)).as_bytes(None),
        truncate_stage=sql.SQL("TRUNCATE {t}").format(t=stage).as_bytes(None))
    return out



_VECTOR_FORMATS: dict[int, str] = {}


def vector_text(vector: np.ndarray) -> str:
    """A float32 vector as pgvector's text input, exactly: nine significant digits tell
    every float32 apart, and pgvector reads them back with strtof."""
    fmt = _VECTOR_FORMATS.get(len(vector))
    if fmt is None:
        fmt = _VECTOR_FORMATS[len(vector)] = "[" + ",".join(["%.9g"] * len(vector)) + "]"
    return fmt % tuple(vector.tolist())
