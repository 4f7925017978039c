"""Long text: megabytes of body index whole; a row beyond the server's text search limit is a
dead letter, and the slot keeps moving.

Regression: one source row whose body held more distinct terms than a Postgres tsvector
holds (1 MiB of lexemes: a log dump, a paste of hashes) failed the apply transaction
with SQLSTATE 54000, and the worker stopped for good; restarted, it met the same row
again, so the slot stalled and WAL piled up on the source.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from .cli_harness import WorkerProcess, cli, query, run_sql, shown, write_config

TABLES = """
[tables."public.notes"]
object_type = "note"
title = "{title}"
body = "{body}"
partition = "{owner}"
attrs = ["open"]

[tables."public.notes".filter]
open = [true]

[tables."public.pages"]
object_type = "page"
title = "{title}"
body = "{body}"
partition = "{owner}"

max_body_chars = 100000

[tables."public.pages".chunks]
size = 20000
overlap = 0
"""


def prose(rng: random.Random, chars: int) -> str:
    """Text of about `chars` characters over a 3,000-word vocabulary, in lines."""
    vocab = ["".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(3))
             for _ in range(3000)]
    words, size = [], 0
    while size < chars:
        line = " ".join(rng.choices(vocab, k=12))
        words.append(line)
        size += len(line) + 1
    return "\n".join(words)


def distinct_tokens(rng: random.Random, n: int) -> str:
    """`n` different 12-digit numbers (terms as written): 1.2 MB of distinct lexemes."""
    return " ".join(f"{x:012d}" for x in rng.sample(range(10**12), n))


def test_long_bodies_index_and_one_beyond_the_limit_is_a_dead_letter(pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    rng = random.Random(7)
    long_prose, huge = prose(rng, 3_000_000), distinct_tokens(rng, 100_000)
    run_sql(dsn, "CREATE TABLE notes (id int PRIMARY KEY, owner text, title text, body text, open boolean)",
            "CREATE TABLE pages (id int PRIMARY KEY, owner text, title text, body text)")
    run_sql(dsn, "INSERT INTO notes VALUES (1, 'user-1', 'three megabytes', %s, true), "
                 "(2, 'user-1', 'copied too large', %s, true)", params=(long_prose, huge))
    config = write_config(tmp_path / "slipstream.toml", dsn, TABLES)

    setup = cli("setup", "--config", str(config), cwd=tmp_path)
    assert setup.returncode == 1, shown(setup)
    assert "1 rows of public.notes went to dead letters" in setup.stderr, shown(setup)
    assert re.search(r"DocumentTooLargeError: \('note', '2', 'leaf'\): its 100,00\d distinct terms "
                     r"take 1,200,0\d\d bytes", setup.stderr), shown(setup)

    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "INSERT INTO notes VALUES (3, 'user-2', 'streamed too large', %s, true)", params=(huge,))
        run_sql(dsn, "INSERT INTO notes VALUES (4, 'user-2', 'after it', 'a short note', true)")
        run_sql(dsn, "INSERT INTO pages VALUES (1, 'user-2', 'chunked', %s)", params=(huge,))
        worker.wait_caught_up(dsn)
        worker.check_alive()

    docs = {(r[0], r[1]): r[2:] for r in query(
        dsn, "SELECT object_type, object_id, length(body), len_body FROM slipstream.docs WHERE NOT deleted")}
    assert docs[("note", "1")] == (len(long_prose), len(long_prose.split()))  # whole, every term counted
    assert ("note", "4") in docs  # the slot moved past the row it could not index
    assert ("note", "2") not in docs and ("note", "3") not in docs
    # The same text in a table with max_body_chars and chunks: the object's own document
    # holds its first 100,000 characters, cut at a space; its chunks hold all of it.
    page = query(dsn, "SELECT body FROM slipstream.docs WHERE object_type = 'page' AND object_id = '1'")[0][0]
    assert len(page) == 99_995 and huge.startswith(page + " "), len(page)
    pieces = query(dsn, "SELECT (payload->>'chunk_start')::int, body FROM slipstream.docs "
                        "WHERE object_type = 'page' AND node_kind = 'chunk' AND NOT deleted ORDER BY 1")
    covered = 0
    for start, piece in pieces:
        assert huge[start:start + len(piece)] == piece and start <= covered + 1
        covered = start + len(piece)
    assert covered == len(huge) and len(pieces) > 60
    letters = query(dsn, "SELECT row_key, error FROM slipstream.dead_letters WHERE resolved_at IS NULL "
                         "ORDER BY row_key")
    assert [k for k, _ in letters] == ['["2"]', '["3"]'], letters
    assert all(e.startswith("DocumentTooLargeError: ('note', ") and 'For a TOML table: [tables."public.notes"] '
               "max_body_chars cuts the object's own document, and its chunks section keeps all" in e
               for _, e in letters), letters
