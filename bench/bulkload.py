"""Bulk loading for the server benchmark: a million rows in minutes, not hours.

Documents come from the same Zipf vocabulary as `corpus.Corpus`, but as arrays of
word ids drawn in bulk. Every vocabulary word is analysed once (each is a single
token, so a document's terms are its words' terms, in order); term counts, field
lengths and the analysed terms follow from the ids. Vectors are feature hashing of
the analysed terms (`UnigramEmbedder`: the buckets and signs of `HashingEmbedder`,
without its bigrams), summed for a whole chunk with one `bincount`. Rows go to an
unlogged staging table through binary COPY, then into the search table with one
INSERT … SELECT per chunk; the GIN indexes are dropped for the load and rebuilt
after it, as one would for any bulk load.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import numpy as np
from corpus import vocabulary
from psycopg import sql
from slipstream.index.analysis import analyze, analyze_doc
from slipstream.index.doc import IndexDoc
from slipstream.index.embedding import _code


def _bucket(feature: str, dim: int) -> tuple[int, float]:
    """HashingEmbedder's bucket and sign of a feature."""
    code = _code(feature, dim)
    return code >> 1, 1.0 if code & 1 else -1.0


class UnigramEmbedder:
    """Feature hashing of analysed terms only (no bigrams), L2-normalised: for queries."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            terms = analyze(text)
            if not terms:
                continue
            idx, sign = zip(*(_bucket(t, self.dim) for t in terms))
            vec = np.bincount(idx, weights=sign, minlength=self.dim)
            norm = float(np.sqrt(vec @ vec))
            if norm > 0:
                out[row] = vec / norm
        return out


class BulkCorpus:
    """Documents as word-id arrays; partition of row i is partitions[i % len(partitions)]."""

    def __init__(self, dim: int, seed: int = 7, vocab_size: int = 5000) -> None:
        self.dim = dim
        self.vocab = vocabulary(vocab_size, seed)
        self.rng = np.random.default_rng(seed)
        weights = 1.0 / np.arange(1, vocab_size + 1) ** 1.1
        self.p = weights / weights.sum()
        names: dict[str, int] = {}
        term_of_word = []
        for word in self.vocab:
            terms = analyze(word)
            assert len(terms) <= 1, word
            term_of_word.append(names.setdefault(terms[0], len(names)) if terms else -1)
        # Term ids in name order, so sorting by id sorts a row's terms as analysis does.
        ordered = sorted(names)
        rank = {t: i for i, t in enumerate(ordered)}
        self.term_of_word = np.array([rank[self_t] if (self_t := next(
            (t for t, i in names.items() if i == w), None)) is not None else -1
            for w in term_of_word], np.int64)
        self.terms = ordered
        buckets = [_bucket(t, dim) for t in self.terms]
        self.bucket = np.array([b for b, _ in buckets], np.int64)
        self.sign = np.array([s for _, s in buckets], np.float64)

    def chunk(self, start: int, n: int, partitions: Sequence[str]) -> list[tuple]:
        """Rows for the staging table: (object_id, partition, title, body, attrs, payload,
        tf json, terms, len_title, len_body, vector)."""
        rng = self.rng
        n_title = rng.integers(3, 9, n)
        n_body = rng.integers(30, 81, n)
        words = rng.choice(len(self.vocab), size=(n, 88), p=self.p)
        terms = self.term_of_word[words]
        in_title = np.arange(88)[None, :] < n_title[:, None]
        in_body = (np.arange(88)[None, :] >= 8) & (np.arange(88)[None, :] < 8 + n_body[:, None])
        used = (in_title | in_body) & (terms >= 0)
        doc_of, col = np.nonzero(used)
        flat = doc_of * self.dim + self.bucket[terms[doc_of, col]]
        vectors = np.bincount(flat, weights=self.sign[terms[doc_of, col]],
                              minlength=n * self.dim).reshape(n, self.dim)
        norms = np.sqrt((vectors * vectors).sum(axis=1))
        vectors = (vectors / np.where(norms > 0, norms, 1.0)[:, None]).astype(np.float32)
        # Term counts per (row, term), title and body, for the whole chunk at once.
        n_terms = len(self.terms)
        codes = doc_of * n_terms + terms[doc_of, col]
        title_codes, title_n = _counts(codes[in_title[doc_of, col]])
        body_codes, body_n = _counts(codes[in_body[doc_of, col]])
        pairs = _counts(np.concatenate([title_codes, body_codes]))[0]
        t_count = np.zeros(pairs.size, np.int64)
        t_count[np.searchsorted(pairs, title_codes)] = title_n
        b_count = np.zeros(pairs.size, np.int64)
        b_count[np.searchsorted(pairs, body_codes)] = body_n
        bounds = np.searchsorted(pairs // n_terms, np.arange(n + 1)).tolist()
        pair_terms = (pairs % n_terms).tolist()
        t_list, b_list = t_count.tolist(), b_count.tolist()
        len_title = np.bincount(doc_of[in_title[doc_of, col]], minlength=n).tolist()
        len_body = np.bincount(doc_of[in_body[doc_of, col]], minlength=n).tolist()
        vocab, names = self.vocab, self.terms
        quoted = [json.dumps(t) for t in names]
        rows = []
        for i in range(n):
            row_words = words[i].tolist()
            nt, nb = int(n_title[i]), int(n_body[i])
            lo, hi = bounds[i], bounds[i + 1]
            ids = pair_terms[lo:hi]
            tf = "{" + ",".join(f"{quoted[t]}:[{a},{b}]" for t, a, b in
                                zip(ids, t_list[lo:hi], b_list[lo:hi])) + "}"
            oid = start + i
            rows.append((str(oid), partitions[oid % len(partitions)],
                         " ".join([vocab[w] for w in row_words[:nt]]),
                         " ".join([vocab[w] for w in row_words[8:8 + nb]]),
                         f'{{"bucket": {oid % 7}}}', f'{{"n": {oid}}}', tf, [names[t] for t in ids],
                         len_title[i], len_body[i], vectors[i]))
        return rows


def _counts(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values (sorted) and how often each occurs."""
    codes = np.sort(codes)
    if codes.size == 0:
        return codes, codes
    starts = np.flatnonzero(np.concatenate([[True], codes[1:] != codes[:-1]]))
    return codes[starts], np.diff(np.append(starts, codes.size))


def check_against_analysis(rows: list[tuple]) -> None:
    """The bulk rows' term counts are exactly what the write path's analysis gives."""
    for r in rows[:200]:
        lex = analyze_doc(IndexDoc("note", r[0], title=r[2], body=r[3], partition=r[1]))
        assert {t: list(v) for t, v in lex.tf.items()} == json.loads(r[6]), r[0]
        assert (lex.len_title, lex.len_body) == (r[8], r[9])


GIN_INDEXES = {
    "docs_tsv": "CREATE INDEX docs_tsv ON {s}.docs USING gin (tsv)",
    "docs_attrs": "CREATE INDEX docs_attrs ON {s}.docs USING gin (attrs jsonb_path_ops)",
}


def rebuild_gin(backend) -> None:
    """Create the GIN indexes `bulk_load` dropped (no-op when they exist)."""
    s = sql.Identifier(backend.schema)
    with backend.connect() as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        for ddl in GIN_INDEXES.values():
            conn.execute(sql.SQL(ddl.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS")).format(s=s))
        conn.commit()


def bulk_load(backend, corpus: BulkCorpus, rows: int, partitions: Sequence[str], *, start: int = 0,
              chunk_rows: int = 50_000, deadline: float = 1800.0,
              gin: bool = True) -> tuple[int, float]:
    """Load `rows` rows into the backend's table; returns (rows loaded, seconds).

    Stops early, with what it has, once `deadline` seconds have passed. With
    ``gin=False`` the GIN indexes stay dropped (call `rebuild_gin` after the last load)."""
    s = sql.Identifier(backend.schema)
    space = next(iter(backend.spaces))
    t0 = time.perf_counter()
    loaded = 0
    with backend.connect() as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        for name in GIN_INDEXES:
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {s}.{i}").format(s=s, i=sql.Identifier(name)))
        conn.execute(sql.SQL(
            "CREATE UNLOGGED TABLE IF NOT EXISTS {s}.bulk_stage (object_id text, partition text, "
            "title text, body text, attrs text, payload text, tf text, terms text[], len_title int4, "
            "len_body int4, emb vector({d}))").format(s=s, d=sql.Literal(backend.spaces[space])))
        conn.commit()
        types = ["text"] * 7 + ["text[]", "int4", "int4", "vector"]
        for offset in range(0, rows, chunk_rows):
            if time.perf_counter() - t0 > deadline:
                break
            batch = corpus.chunk(start + offset, min(chunk_rows, rows - offset), partitions)
            if offset == 0:
                check_against_analysis(batch)
            with conn.cursor().copy(sql.SQL("COPY {s}.bulk_stage FROM STDIN (FORMAT BINARY)")
                                    .format(s=s)) as copy:
                copy.set_types(types)
                for row in batch:
                    copy.write_row(row)
            conn.execute(sql.SQL(
                "INSERT INTO {s}.docs (object_type, object_id, node_kind, partition, title, body, attrs, "
                "payload, tf, tsv, len_title, len_body, {emb}) SELECT 'note', object_id, 'leaf', partition, "
                "title, body, attrs::jsonb, payload::jsonb, tf::jsonb, array_to_tsvector(terms), "
                "len_title, len_body, emb FROM {s}.bulk_stage").format(
                    s=s, emb=sql.Identifier(f"emb_{space}")))
            conn.execute(sql.SQL("TRUNCATE {s}.bulk_stage").format(s=s))
            conn.commit()
            loaded += len(batch)
        conn.execute(sql.SQL("DROP TABLE {s}.bulk_stage").format(s=s))
        conn.commit()
    if gin:
        rebuild_gin(backend)
    return loaded, time.perf_counter() - t0


def log_loaded(backend, after_id: int = 0) -> int:
    """Append a change-log entry (``u``) for every loaded row with docs.id above `after_id`,
    in id order, as the worker's apply step would have; returns the highest id logged.

    The server's scope cache is keyed by the change log, so rows loaded around the
    worker need their entries before it can hold them."""
    from slipstream.shardsync.changelog import ChangeLog

    log = ChangeLog(backend.schema)
    s = sql.Identifier(backend.schema)
    with backend.connect() as conn:
        log.migrate(conn)
        conn.execute(sql.SQL(
            "INSERT INTO {s}.changes (seq, partition, object_type, object_id, node_kind, op) "
            "SELECT m.last + row_number() OVER (ORDER BY d.id), d.partition, d.object_type, "
            "d.object_id, d.node_kind, 'u' FROM {s}.docs d, "
            "(SELECT coalesce(max(seq), 0) AS last FROM {s}.changes) m WHERE d.id > %s").format(s=s),
            (after_id,))
        (top,) = conn.execute(sql.SQL("SELECT coalesce(max(id), 0) FROM {s}.docs").format(s=s)).fetchone()
        conn.execute(sql.SQL("ANALYZE {s}.changes").format(s=s))
        conn.commit()
    return int(top)
