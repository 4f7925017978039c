"""A table taken out of the configuration: said plainly, and forgotten only when asked.

Regression: with a table's section removed, its documents stayed searchable (and on
devices) with nothing said, `status` went on listing its copy, and the publication went
on carrying its changes for the worker to decode and drop. `setup` (and `run`, as the
log event `tables_unconfigured`) now names such a table; `setup --forget` takes it out
of the publication and tombstones its documents, so devices delete them too. Nothing is
tombstoned unasked: a section removed by mistake must not empty every device.
"""

from __future__ import annotations

from pathlib import Path

from .cli_harness import WorkerProcess, cli, query, run_sql, shown, write_config

DDL = """
CREATE TABLE public.notes (id int PRIMARY KEY, owner text NOT NULL, title text NOT NULL);
CREATE TABLE public.tags (id int PRIMARY KEY, owner text NOT NULL, name text NOT NULL);
INSERT INTO notes SELECT g, 'user-1', 'note ' || g FROM generate_series(1, 5) g;
INSERT INTO tags SELECT g, 'user-1', 'tag ' || g FROM generate_series(1, 4) g;
"""
NOTES = """
[tables."public.notes"]
object_type = "note"
title = "{title}"
partition = "{owner}"
"""
TAGS = """
[tables."public.tags"]
object_type = "tag"
title = "{name}"
partition = "{owner}"
"""


def live(dsn: str, object_type: str) -> int:
    return query(dsn, "SELECT count(*) FROM slipstream.docs WHERE object_type = %s AND NOT deleted",
                 (object_type,))[0][0]


def published(dsn: str) -> list[str]:
    return [r[0] for r in query(dsn, "SELECT tablename FROM pg_publication_tables "
                                     "WHERE pubname = 'slipstream' ORDER BY 1")]


def test_a_table_left_out_is_named_and_forgotten_only_when_asked(pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    run_sql(dsn, DDL)
    config = write_config(tmp_path / "slipstream.toml", dsn, NOTES + TAGS)
    assert cli("setup", "--config", str(config), cwd=tmp_path).returncode == 0
    assert (live(dsn, "note"), live(dsn, "tag")) == (5, 4)

    write_config(config, dsn, NOTES)
    left = cli("setup", "--config", str(config), cwd=tmp_path)
    assert left.returncode == 0, shown(left)
    assert "public.tags: no longer configured; its documents stay searchable" in left.stdout
    assert "--forget public.tags" in left.stdout
    assert (live(dsn, "note"), live(dsn, "tag")) == (5, 4)  # nothing tombstoned unasked
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        assert any(e.get("event") == "tables_unconfigured" and e.get("tables") == ["public.tags"]
                   for e in worker.events())

    still = cli("setup", "--config", str(config), "--forget", "public.notes", cwd=tmp_path)
    assert still.returncode == 2 and "still configured" in still.stderr, shown(still)
    never = cli("setup", "--config", str(config), "--forget", "public.nope", cwd=tmp_path)
    assert never.returncode == 2 and "was ever copied here" in never.stderr, shown(never)
    assert live(dsn, "note") == 5

    seq = query(dsn, "SELECT max(seq) FROM slipstream.changes")[0][0]
    forget = cli("setup", "--config", str(config), "--forget", "public.tags", cwd=tmp_path)
    assert forget.returncode == 0, shown(forget)
    assert "public.tags: forgotten" in forget.stdout and "no longer configured" not in forget.stdout
    assert (live(dsn, "note"), live(dsn, "tag")) == (5, 0)
    assert query(dsn, "SELECT op, count(*) FROM slipstream.changes WHERE seq > %s GROUP BY op",
                 (seq,)) == [("d", 4)]  # devices delete them too
    assert published(dsn) == ["notes"]
    status = cli("status", "--config", str(config), cwd=tmp_path)
    assert status.returncode == 0 and "public.tags" not in status.stdout, shown(status)
    again = cli("setup", "--config", str(config), cwd=tmp_path)
    assert again.returncode == 0 and "public.tags" not in again.stdout, shown(again)

    # Configured again later, it is copied again like any new table.
    run_sql(dsn, "INSERT INTO tags VALUES (5, 'user-1', 'tag 5')")
    write_config(config, dsn, NOTES + TAGS)
    back = cli("setup", "--config", str(config), cwd=tmp_path)
    assert back.returncode == 0 and "snapshot: public.tags: 5 rows" in back.stdout, shown(back)
    assert live(dsn, "tag") == 5 and published(dsn) == ["notes", "tags"]
