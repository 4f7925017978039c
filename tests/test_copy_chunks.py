"""The copy reads a table of long texts a few rows at a time, not `snapshot_chunk_rows` of them.

Regression: the copy read `snapshot_chunk_rows` (5,000) rows per chunk whatever their
size, and analysis kept the last 8,192 texts it read: copying 300 rows of 1 MB each
(300 MB of text) took 1.97 GB of memory, and a table of 5,000 texts of 100 KB would take
several. A chunk now also stops at `batch_max_bytes` of row data (measured by Postgres
without detoasting), and analysis keeps at most 16 M characters of recent texts: the
same copy peaks at 225 MB.
"""

from __future__ import annotations

import psycopg
from slipstream.index import analysis
from slipstream.worker.snapshot import read_chunks, table_shape

from .cli_harness import run_sql


def test_chunks_stop_at_the_byte_budget_and_hold_every_row_once_in_key_order(pg_dsn: str) -> None:
    sizes = {(g, s): (g * 7 + s * 13) % 50 * 1000 for g in range(1, 31) for s in (1, 2)}
    sizes[(12, 2)] = 250_000  # alone above the budget: a chunk of its own
    run_sql(pg_dsn, "CREATE TABLE pages (book int, seq int, title text, body text, n bigint, "
                    "PRIMARY KEY (book, seq))")
    with psycopg.connect(pg_dsn) as conn:
        with conn.cursor().copy("COPY pages FROM STDIN") as copy:
            for (book, seq), size in sizes.items():
                copy.write_row((book, seq, f"page {book}.{seq}", "x" * size, size))
        conn.commit()
        shape = table_shape(conn, "public.pages")
        conn.commit()
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        budget = 100_000
        chunks = list(read_chunks(conn, shape, None, chunk_rows=25, chunk_bytes=budget))
        conn.rollback()
    keys = [(int(r["book"]), int(r["seq"])) for chunk in chunks for r in chunk]
    assert keys == sorted(sizes)  # every row once, in key order

    def size(row: dict) -> int:  # as Postgres measures it: the texts' lengths, 4 + 4 + 8 bytes
        return len(row["title"]) + len(row["body"]) + 16

    for chunk in chunks:
        assert len(chunk) <= 25
        assert len(chunk) == 1 or sum(map(size, chunk)) <= budget, [len(c) for c in chunks]
    for chunk, after in zip(chunks, chunks[1:]):  # cut only where the next row would not fit
        assert len(chunk) == 25 or sum(map(size, chunk)) + size(after[0]) > budget
    assert [len(c) for c in chunks if any(len(r["body"]) == 250_000 for r in c)] == [1]
    assert len(chunks) >= sum(sizes.values()) // budget

    # Without a byte budget, chunks are `chunk_rows` long as before.
    with psycopg.connect(pg_dsn) as conn:
        assert [len(c) for c in read_chunks(conn, shape, None, chunk_rows=25)] == [25, 25, 10]


def test_analysis_keeps_a_bounded_number_of_characters_of_recent_texts() -> None:
    texts = [f"document {i} " + "word " * 400_000 for i in range(12)]  # 2 MB each
    for text in texts:
        assert analysis.analyze(text)[:2] == ["document", str(texts.index(text))]
    held = sum(map(len, analysis._recent))
    assert held <= analysis._RECENT_CHARS and held == analysis._recent_chars
    assert texts[-1] in analysis._recent  # the newest stays: the write path reads it again
