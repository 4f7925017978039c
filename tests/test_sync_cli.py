"""Device sync as an operator and a device run it: `slipstream token issue`, `serve`,
`shard sync` and `shard search`, each a real process, over real HTTP."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from .cli_harness import cli, command, environ, free_port, shown, toml_string, write_config
from .shardsync_helpers import LogWriter, doc

SECRET = "cli-sync-secret-" + "w" * 32


@pytest.fixture
def served(pg_dsn, tmp_path):
    writer = LogWriter(pg_dsn, spaces={"local": 16})
    port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path / "slipstream.toml", pg_dsn, "", extra=(
        f"\n[sync]\nlisten = \"127.0.0.1\"\nport = {port}\nmetrics_port = {metrics_port}\n"
        f"token_secret_env = \"TEST_SYNC_SECRET\"\naudience = {toml_string('app')}\n"))
    env = environ({"TEST_SYNC_SECRET": SECRET})
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command("serve", "--config", str(config), "--log-level", "warning"),
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.1)
        # `serve` serves its metrics on the configured port of their own
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        assert 'slipstream_sync_requests_total{endpoint="healthz",status="200"}' in metrics.text
        yield writer, url, config, env
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()
        writer.close()


def test_issue_a_token_sync_a_shard_and_search_it_like_the_server(served, tmp_path):
    writer, url, config, env = served
    writer.apply([doc("1", "user-1", "apple banana"), doc("2", "user-1", "quarterly report"),
                  doc("3", "user-2", "apple pie secret")])
    r = cli("token", "issue", "--config", str(config), "--partition", "user-1", "--ttl", "10m",
            cwd=tmp_path, env=env)
    assert r.returncode == 0, shown(r)
    token = r.stdout.strip()
    out = tmp_path / "user-1.db"
    r = cli("shard", "sync", url, "--token", token, "--out", str(out), cwd=tmp_path, env=env)
    assert r.returncode == 0, shown(r)
    assert "snapshot" in r.stdout and out.exists()
    writer.apply([doc("4", "user-1", "apple crumble")], deletes=[("note", "2", "leaf")])
    r = cli("shard", "sync", url, "--out", str(out), cwd=tmp_path,
            env={**env, "SLIPSTREAM_TOKEN": token})
    assert r.returncode == 0, shown(r)
    r = cli("shard", "search", str(out), "apple", "--json", "--config", str(config),
            cwd=tmp_path, env=env)
    assert r.returncode == 0, shown(r)
    device = [(h["object_id"], h["score"]) for h in json.loads(r.stdout)]
    server = [(h.object_id, h.score) for h in writer.index.search("apple", partition="user-1")]
    assert device == server and {i for i, _ in device} == {"1", "4"}
    # `slipstream search` asks the server's index the same question, with the same options.
    r = cli("search", "apple", "--config", str(config), "--partition", "user-1", "--json",
            cwd=tmp_path, env=env)
    assert r.returncode == 0, shown(r)
    assert [(h["object_id"], h["score"]) for h in json.loads(r.stdout)] == device
    r = cli("search", "apple", "--config", str(config), "--partition", "user-1", "--mode", "precision",
            cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.count(" note ") == 2, shown(r)


def test_refusals_and_bad_config_are_one_clear_line(served, tmp_path):
    _, url, config, env = served
    r = cli("shard", "sync", url, "--token", "not-a-token", "--out", str(tmp_path / "x.db"),
            cwd=tmp_path, env=env)
    assert r.returncode == 1 and "401" in r.stderr and "new device token" in r.stderr
    assert not (tmp_path / "x.db").exists()
    # A shard path in a directory that does not exist: one line, not a traceback.
    good = cli("token", "issue", "--config", str(config), "--partition", "user-1", cwd=tmp_path, env=env)
    r = cli("shard", "sync", url, "--token", good.stdout.strip(), "--out", str(tmp_path / "no" / "x.db"),
            cwd=tmp_path, env=env)
    assert r.returncode == 1, shown(r)
    assert r.stderr.startswith(f"error: cannot write the shard {tmp_path / 'no' / 'x.db'}: No such file "
                               "or directory"), shown(r)
    assert "Traceback" not in r.stderr and not (tmp_path / "no").exists()
    r = cli("token", "issue", "--config", str(config), "--partition", "p", cwd=tmp_path,
            env=environ())
    assert r.returncode == 2 and "TEST_SYNC_SECRET" in r.stderr
    bad = Path(tmp_path / "bad.toml")
    bad.write_text(config.read_text().replace('\nport = ', '\nprot = '))
    r = cli("check", "--config", str(bad), cwd=tmp_path, env=env)
    assert r.returncode == 2 and "sync.prot" in r.stderr and "port" in r.stderr


def test_compact_command_reports_and_raises_the_horizon(served, tmp_path):
    writer, _, config, env = served
    writer.apply([doc("1", "user-1", "apple"), doc("2", "user-1", "pear")])
    writer.apply([doc("1", "user-1", "apple again")], deletes=[("note", "2", "leaf")])
    r = cli("compact", "--config", str(config), "--retention", "0", cwd=tmp_path, env=env)
    assert r.returncode == 0, shown(r)
    assert "2 superseded" in r.stdout and "1 old tombstones" in r.stdout
    assert "horizon 4" in r.stdout


def test_a_sync_killed_mid_snapshot_leaves_nothing_half_written_and_the_next_run_completes(
        served, tmp_path):
    import os
    import signal

    from .proxy import Proxy
    from .sync_server_helpers import server_state, shard_state

    writer, url, config, env = served
    import random

    rng = random.Random(5)
    words = [f"w{n}x{rng.randint(0, 10**6)}" for n in range(5000)]  # barely compressible
    writer.apply([doc(str(i), "user-1", " ".join(rng.choices(words, k=300)))
                  for i in range(400)])
    token = issue(config, env, tmp_path)
    out = tmp_path / "user-1.db"
    port = int(url.rsplit(":", 1)[1])
    with Proxy("127.0.0.1", port) as proxy:
        proc = subprocess.Popen(command("shard", "sync", f"http://127.0.0.1:{proxy.port}",
                                        "--token", token, "--out", str(out)),
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size for p in tmp_path.glob("user-1.db.download-*")):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.01)
        proxy.pause()  # bytes stop mid-transfer
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proxy.resume()
    assert not out.exists()  # nothing half-written where a shard is expected
    r = cli("shard", "sync", url, "--token", token, "--out", str(out), cwd=tmp_path, env=env)
    assert r.returncode == 0, shown(r)
    assert not list(tmp_path.glob("user-1.db.download-*"))
    assert shard_state(str(out)) == server_state(writer.dsn, ["user-1"], ["local"])


def issue(config: Path, env: dict, cwd: Path) -> str:
    r = cli("token", "issue", "--config", str(config), "--partition", "user-1", cwd=cwd, env=env)
    assert r.returncode == 0, shown(r)
    return r.stdout.strip()


@pytest.mark.parametrize("key", ["port", "metrics_port"])
def test_serve_on_a_port_in_use_is_a_clear_configuration_error(pg_dsn, tmp_path, key):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = {"port": free_port(), "metrics_port": free_port(), key: taken}
        config = write_config(tmp_path / "slipstream.toml", pg_dsn, "", extra=(
            f"\n[sync]\nlisten = \"127.0.0.1\"\nport = {ports['port']}\n"
            f"metrics_port = {ports['metrics_port']}\ntoken_secret_env = \"TEST_SYNC_SECRET\"\n"))
        r = cli("serve", "--config", str(config), cwd=tmp_path,
                env=environ({"TEST_SYNC_SECRET": SECRET}), timeout=60)
    assert r.returncode == 2, shown(r)
    assert f"sync.{key}" in r.stderr and f"cannot listen on 127.0.0.1:{taken}" in r.stderr
    assert "Traceback" not in r.stderr
