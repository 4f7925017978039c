"""Changing the model as an operator does: edit the TOML file, see the refusal, run `reembed`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psycopg
import pytest

from .cli_harness import cli, shown
from .fake_openai import FakeEmbeddings, model_vectors

DIM = 16


def config(path: Path, dsn: str, url: str, model: str) -> Path:
    path.write_text(f"""
[source]
dsn = {json.dumps(dsn)}

[spaces]
local = {DIM}

[embedders.local]
kind = "http"
url = {json.dumps(url)}
model = {json.dumps(model)}
api_key = "sk-cli-secret"
max_retries = 1

[worker]
http_port = 0

[tables."public.notes"]
title = "{{title}}"
partition = "org"
""", encoding="utf-8")
    return path


@pytest.fixture
def fake():
    with FakeEmbeddings({"emb-a": DIM, "emb-b": DIM}) as server:
        yield server


def test_a_new_model_is_refused_until_reembed_switches_the_space(pg_dsn: str, fake, tmp_path) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, title text)")
        conn.execute("INSERT INTO notes (title) SELECT 'note ' || g FROM generate_series(1, 25) g")
    cfg = config(tmp_path / "slipstream.toml", pg_dsn, fake.url, "emb-a")
    first = cli("setup", "--config", str(cfg), cwd=tmp_path)
    assert first.returncode == 0, shown(first)

    config(cfg, pg_dsn, fake.url, "emb-b")  # the operator changes the model
    refused = cli("status", "--config", str(cfg), cwd=tmp_path)
    assert refused.returncode == 2, shown(refused)
    assert "slipstream reembed --space local" in refused.stderr

    done = cli("reembed", "--config", str(cfg), "--space", "local", "--rate", "1000", cwd=tmp_path)
    assert done.returncode == 0, shown(done)
    assert "25/25 rows (100%)" in done.stdout and "now holds the new vectors" in done.stdout
    assert "sk-cli-secret" not in done.stdout + done.stderr
    with psycopg.connect(pg_dsn) as conn:
        title, vec = conn.execute("SELECT title, emb_local::text FROM slipstream.docs "
                                  "WHERE object_id = '7'").fetchone()
    stored = np.asarray(json.loads(vec), dtype=np.float32)
    assert np.allclose(stored, model_vectors("emb-b", DIM, [title])[0])
    status = cli("status", "--config", str(cfg), cwd=tmp_path)
    assert status.returncode == 0, shown(status)
