"""A table's mapping changed in the configuration: its rows are mapped again.

Regression: a table's documents were made once, at its copy, and after that only rows
that changed were mapped again. Editing a template, a filter or the object type and
restarting left every other row's documents as the old configuration made them
(titles in the old form, rows the new filter leaves out still searchable, devices
given documents of an object type no longer configured), with nothing said. The copy
now records what decided its documents (`Registry.fingerprint`), and `setup` (or the
setup inside `run`) copies a table again when that changes; `--recopy` does so on
demand, for a Python mapper whose code changed.
"""

from __future__ import annotations

from pathlib import Path

from .cli_harness import WorkerProcess, cli, query, run_sql, shown, write_config

DDL = """
CREATE TABLE public.notes (
    id int PRIMARY KEY, owner text NOT NULL, title text NOT NULL, status text NOT NULL
);
INSERT INTO notes SELECT g, 'user-' || (g % 2), 'note ' || g,
    CASE WHEN g % 3 = 0 THEN 'draft' ELSE 'published' END FROM generate_series(1, 30) g;
"""
V1 = """
[tables."public.notes"]
object_type = "note"
title = "{title}"
partition = "{owner}"
"""
V2 = V1.replace('title = "{title}"', 'title = "{title} ({status})"') + """
[tables."public.notes".filter]
status = ["published"]
"""
V3 = V2.replace('object_type = "note"', 'object_type = "memo"')


def live(dsn: str) -> dict[tuple[str, str], str]:
    return {(t, i): title for t, i, title in query(
        dsn, "SELECT object_type, object_id, title FROM slipstream.docs WHERE NOT deleted")}


def last_seq(dsn: str) -> int:
    return query(dsn, "SELECT coalesce(max(seq), 0) FROM slipstream.changes")[0][0]


def expected(dsn: str, object_type: str, template: str, published_only: bool) -> dict:
    return {(object_type, str(i)): template.format(title=title, status=status)
            for i, title, status in query(dsn, "SELECT id, title, status FROM notes")
            if status == "published" or not published_only}


def test_a_changed_mapping_maps_every_row_again(pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    run_sql(dsn, DDL)
    config = write_config(tmp_path / "slipstream.toml", dsn, V1)
    first = cli("setup", "--config", str(config), cwd=tmp_path)
    assert first.returncode == 0, shown(first)
    assert live(dsn) == expected(dsn, "note", "{title}", False)
    seq = last_seq(dsn)

    # The same configuration again: nothing is copied again or logged.
    again = cli("setup", "--config", str(config), cwd=tmp_path)
    assert again.returncode == 0 and "mapping changed" not in again.stdout, shown(again)
    assert last_seq(dsn) == seq

    # Another title template and a filter: every row is mapped again by setup.
    write_config(config, dsn, V2)
    second = cli("setup", "--config", str(config), cwd=tmp_path)
    assert second.returncode == 0, shown(second)
    assert "public.notes: its mapping changed in the configuration since its copy" in second.stdout
    assert live(dsn) == expected(dsn, "note", "{title} ({status})", True)
    # One entry per document that changed: 20 new titles, 10 drafts tombstoned.
    assert last_seq(dsn) - seq == 30
    assert query(dsn, "SELECT count(*) FROM slipstream.changes WHERE seq > %s AND op = 'd'",
                 (seq,)) == [(10,)]

    # Another object type, taken up by `run`'s own setup while it streams.
    write_config(config, dsn, V3)
    with WorkerProcess(config, cwd=tmp_path) as worker:
        worker.wait_streaming(dsn)
        run_sql(dsn, "UPDATE notes SET title = 'edited' WHERE id = 1",
                "INSERT INTO notes VALUES (31, 'user-1', 'note 31', 'published')")
        worker.wait_for("the table copied again", lambda: any(
            e.get("event") == "backfill_done" for e in worker.events()))
        worker.wait_caught_up(dsn)
        assert any(e.get("event") == "setup_done" and e.get("remapped") == ["public.notes"]
                   for e in worker.events())
    assert live(dsn) == expected(dsn, "memo", "{title} ({status})", True)
    assert query(dsn, "SELECT count(*) FROM slipstream.docs WHERE object_type = 'note' "
                      "AND NOT deleted") == [(0,)]
    assert query(dsn, "SELECT count(*) FROM slipstream.dead_letters") == [(0,)]


def test_recopy_copies_a_table_again_on_demand_and_an_older_copy_is_adopted(
        pg_dsn: str, tmp_path: Path) -> None:
    dsn = pg_dsn
    run_sql(dsn, DDL)
    config = write_config(tmp_path / "slipstream.toml", dsn, V1)
    assert cli("setup", "--config", str(config), cwd=tmp_path).returncode == 0
    seq = last_seq(dsn)

    recopy = cli("setup", "--config", str(config), "--recopy", "public.notes", cwd=tmp_path)
    assert recopy.returncode == 0, shown(recopy)
    assert "public.notes: copied again, as asked" in recopy.stdout
    assert "snapshot: public.notes: 30 rows" in recopy.stdout
    assert last_seq(dsn) == seq  # the same documents: none written, none logged

    unknown = cli("setup", "--config", str(config), "--recopy", "public.nope", cwd=tmp_path)
    assert unknown.returncode == 2 and "not a configured table" in unknown.stderr, shown(unknown)

    # A copy made before mappings were recorded is adopted as it is, not copied again.
    run_sql(dsn, "UPDATE slipstream.snapshot_progress SET mapping = NULL")
    write_config(config, dsn, V2)
    adopted = cli("setup", "--config", str(config), cwd=tmp_path)
    assert adopted.returncode == 0 and "mapping changed" not in adopted.stdout, shown(adopted)
    assert last_seq(dsn) == seq
    assert query(dsn, "SELECT mapping IS NOT NULL FROM slipstream.snapshot_progress") == [(True,)]


def test_a_space_added_to_the_configuration_embeds_every_row_in_it(pg_dsn: str, tmp_path: Path) -> None:
    """Regression: existing documents were never embedded in a space added later (and
    `pending embeddings` said 0), so semantic search in it found only rows written since."""
    dsn = pg_dsn
    run_sql(dsn, DDL)
    config = write_config(tmp_path / "slipstream.toml", dsn, V1)
    assert cli("setup", "--config", str(config), cwd=tmp_path).returncode == 0
    seq = last_seq(dsn)
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("[spaces]\nlocal = 16\n", "[spaces]\nlocal = 16\nwide = 32\n")
                      .replace("[embedders.local]", '[embedders.wide]\nkind = "hashing"\n\n'
                                                    "[embedders.local]"), encoding="utf-8")
    added = cli("setup", "--config", str(config), cwd=tmp_path)
    assert added.returncode == 0, shown(added)
    assert "its mapping changed" in added.stdout, shown(added)
    assert query(dsn, "SELECT count(*), count(emb_wide), count(emb_local) FROM slipstream.docs "
                      "WHERE NOT deleted") == [(30, 30, 30)]
    assert query(dsn, "SELECT count(*) FROM slipstream.docs WHERE pending_spaces <> '{}'") == [(0,)]
    assert last_seq(dsn) - seq == 30  # devices pull every row's new vector
