"""What the README and docs/ show is checked against the code, so the two cannot drift.

* Every Python block in the README runs (in a subprocess, so `@register` calls do not
  leak into other tests), with `dsn` naming a real database.
* Every TOML block in the README and docs/, and every sample config in deploy/, loads.
* Every `slipstream …` command line in the README names a command and options that exist.
* The README's metrics table lists exactly the metrics `Metrics` exports, and every
  `slipstream_…` name mentioned anywhere in the docs exists.
* Every error class the troubleshooting table names is a `SlipstreamError`.
* The DDL in docs/shard-format.md is the schema `SQLiteBackend` creates, column by column.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from prometheus_client.metrics_core import Metric
from slipstream.index.errors import SlipstreamError
from slipstream.worker.cli import main as cli
from slipstream.worker.config import load_config
from slipstream.worker.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, ROOT / "deploy" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(), re.MULTILINE | re.DOTALL)


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table after `heading`, as cell lists."""
    after = text[text.index(heading):]
    rows = []
    for line in after.splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif rows:
            break
    return rows[2:]  # header and separator


def readme_metrics(*tables: str) -> dict[str, str]:
    """Metric name -> type, from the README's metrics tables (by default the main one)."""
    out = {}
    for heading in tables or ("### Metrics",):
        for name, kind, *_ in _table_rows(README.read_text(), heading):
            out[name.strip("`")] = kind
    return out


def _exported(family: Metric) -> str:
    return family.name + "_total" if family.type == "counter" else family.name


# --- metrics ---------------------------------------------------------------------------


def test_readme_metrics_table_matches_the_metrics_class() -> None:
    families = {_exported(f): f.type for f in Metrics().registry.collect()}
    assert readme_metrics("### Metrics", "### Embedding metrics") == families


def test_readme_sync_metrics_table_matches_the_sync_server_metrics() -> None:
    from slipstream.shardsync.server_metrics import SyncMetrics

    families = {_exported(f): f.type for f in SyncMetrics().registry.collect()}
    assert readme_metrics("### Sync server metrics") == families


def test_every_metric_name_in_the_docs_exists() -> None:
    from slipstream.shardsync.server_metrics import SyncMetrics

    exported = {_exported(f) for m in (Metrics(), SyncMetrics()) for f in m.registry.collect()}
    suffixes = ("_bucket", "_count", "_sum", "_created")
    for path in DOCS:
        # A name followed by `<` is a template (`slipstream_changes_<schema>`), not a metric.
        for name in set(re.findall(r"\bslipstream_[a-z_]+\b(?!<)", path.read_text())):
            base = next((name[: -len(s)] for s in suffixes if name.endswith(s)), name)
            assert name in exported or base in exported, f"{path.name} mentions {name}"


# --- errors ----------------------------------------------------------------------------


def _error_classes() -> dict[str, type]:
    import slipstream.worker.app
    import slipstream.worker.embedders  # noqa: F401

    found: dict[str, type] = {}
    todo = [SlipstreamError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def test_troubleshooting_table_names_real_errors_for_each_failure_a_user_meets() -> None:
    rows = _table_rows(README.read_text(), "## Troubleshooting")
    named = set()
    for symptom, _cause, _fix in rows:
        named |= set(re.findall(r"\(`([A-Z][A-Za-z]+Error)`\)", symptom))
        named |= set(re.findall(r"error=([A-Z][A-Za-z]+Error)", symptom))
    known = _error_classes()
    assert named, "no error class named in the troubleshooting table"
    assert named <= set(known), f"not SlipstreamErrors: {named - set(known)}"
    # The failures the worker can stop on, each with a row.
    for must in ("ConfigError", "WalLevelError", "ReplicationPermissionError", "SlotInUseError",
                 "SlotInvalidatedError", "SearchDatabaseError", "TupleShapeError"):
        assert must in named, f"the troubleshooting table has no row for {must}"
    text = " ".join(" ".join(r) for r in rows)
    for topic in ("dead_letters", "pending_embeddings", "deadletter retry"):
        assert topic in text


# --- configuration ---------------------------------------------------------------------


def _toml_sources() -> list[tuple[str, str]]:
    out = [(f"{p.name} block {i}", b) for p in DOCS for i, b in enumerate(blocks(p, "toml"))]
    out += [(p.name, p.read_text()) for p in sorted((ROOT / "deploy").glob("*.toml"))]
    return out


@pytest.mark.parametrize(("where", "text"), _toml_sources(), ids=[w for w, _ in _toml_sources()])
def test_toml_in_the_docs_loads(where: str, text: str, tmp_path: Path, monkeypatch) -> None:
    for var in ("APP_DATABASE_URL", "SEARCH_DATABASE_URL", "OPENAI_API_KEY"):
        monkeypatch.setenv(var, "postgresql://x@localhost/app")
    path = tmp_path / "slipstream.toml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.spaces, where


# --- command lines ---------------------------------------------------------------------


def _command_lines() -> list[str]:
    lines = []
    for path in DOCS:
        for block in blocks(path, "sh"):
            for line in block.splitlines():
                line = line.split("#")[0].strip()
                for part in re.split(r"&&|\|", line):
                    part = part.strip()
                    m = re.match(r"(?:\S*/)?slipstream\s+(.*)", part)
                    if m and not part.startswith(("pip", "python")):
                        lines.append(m.group(1).strip())
    return lines


def test_readme_command_lines_name_real_commands_and_options() -> None:
    lines = _command_lines()
    assert any(line.startswith("setup") for line in lines)
    for line in lines:
        words = [w for w in line.split() if not w.startswith("[")]
        group: click.Command = cli
        while isinstance(group, click.Group) and words and not words[0].startswith("-"):
            name = words.pop(0)
            if name not in group.commands and name == "serve":
                break  # the sync server's command, registered beside the worker's
            assert name in group.commands, f"`slipstream {line}`: no command {name!r}"
            group = group.commands[name]
        options = {o for p in group.params for o in getattr(p, "opts", [])}
        for word in words:
            if word.startswith("--") and group is not cli:
                assert word.split("=")[0] in options, f"`slipstream {line}`: no option {word}"


# --- Python examples -------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(blocks(README, "python"))))
def test_readme_python_block_runs(index: int, pg_dsn: str, tmp_path: Path) -> None:
    code = blocks(README, "python")[index]
    if code.startswith("# needs a running"):  # a client of a server: check what it imports
        imports = "\n".join(line for line in code.splitlines() if line.startswith(("from ", "import ")))
        code = imports
    script = "import os\ndsn = os.environ['DSN']\n" + textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          check=False, text=True, timeout=120, env={**os.environ, "DSN": pg_dsn})
    assert done.returncode == 0, f"README python block {index}:\n{code}\n{done.stderr}"


# --- shard format ----------------------------------------------------------------------


def _schema(conn: sqlite3.Connection) -> dict[str, object]:
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'docs_fts_%' "
        "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    out: dict[str, object] = {}
    for t in tables:
        out[t] = {
            "columns": conn.execute(f"PRAGMA table_xinfo({t})").fetchall(),
            "indexes": sorted(
                (bool(unique), origin, tuple(c[2] for c in conn.execute(f"PRAGMA index_info('{name}')")))
                for _, name, unique, origin, _ in conn.execute(f"PRAGMA index_list({t})")),
            "sql": " ".join(conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (t,))
                            .fetchone()[0].split()) if t == "docs_fts" else None,
        }
    return out


def test_shard_format_ddl_is_what_the_sqlite_backend_creates(tmp_path: Path) -> None:
    from slipstream.index import SQLiteBackend

    (ddl,) = blocks(ROOT / "docs" / "shard-format.md", "sql")
    documented = sqlite3.connect(":memory:")
    documented.executescript(ddl)
    path = tmp_path / "shard.db"
    SQLiteBackend(str(path), spaces={"local": 4}).close()
    real = sqlite3.connect(path)
    try:
        expected, got = _schema(real), _schema(documented)
        assert set(got) == set(expected)
        for table in expected:
            assert got[table] == expected[table], f"docs/shard-format.md differs on {table}"
    finally:
        real.close()
        documented.close()
