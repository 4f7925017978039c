"""The worker as users run it: a TOML file and the `slipstream` command, in subprocesses.

`cli(...)` runs one command to completion; `WorkerProcess` runs `slipstream run` in the
background (its output in a log file, shown when something fails) and stops it with
SIGTERM. Waiting happens from outside the process, as an operator would: on
`pg_replication_slots` and on the search table.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
from slipstream.worker.lsn import parse_lsn

SLOT = "slipstream"
_SCRIPT = Path(sys.executable).with_name("slipstream")


def command(*args: str) -> list[str]:
    """The `slipstream` console script next to this Python, or the same entry point via -c."""
    if _SCRIPT.exists():
        return [str(_SCRIPT), *args]
    return [sys.executable, "-c", "from slipstream.worker.cli import main; main()", *args]


def environ(extra: Mapping[str, str] | None = None,
            pythonpath: Path | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env.pop("SLIPSTREAM_CONFIG", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return env


def cli(*args: str, cwd: Path, env: Mapping[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(*args), cwd=cwd, env=dict(env or environ()), capture_output=True,
                          text=True, timeout=timeout)


def shown(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_config(path: Path, dsn: str, tables: str, *, worker: Mapping[str, Any] | None = None,
                 extra: str = "") -> Path:
    """A config: the DSN, one hashing space, fast batches, the given [tables...] sections."""
    settings = {"batch_max_seconds": 0.02, "status_interval_seconds": 1, "http_port": 0,
                **(worker or {})}
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path.write_text(
        f"[source]\ndsn = {toml_string(dsn)}\n\n[spaces]\nlocal = 16\n\n"
        f'[embedders.local]\nkind = "hashing"\n\n[worker]\n' + "\n".join(lines) + "\n"
        + extra + "\n" + tables, encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_sql(dsn: str, *statements: str, params: Sequence[Any] | None = None) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in statements:
            conn.execute(s, params)


def query(dsn: str, statement: str, params: Sequence[Any] | None = None) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(statement, params).fetchall()


def live_docs(dsn: str, object_type: str) -> dict[str, tuple[str, str, str]]:
    """object_id -> (partition, title, body) of the live search rows of one type."""
    return {r[0]: (r[1], r[2], r[3]) for r in query(
        dsn, "SELECT object_id, partition, title, body FROM slipstream.docs "
             "WHERE object_type = %s AND NOT deleted", (object_type,))}


def slot_row(dsn: str) -> tuple[bool, int | None] | None:
    """(active, confirmed_flush_lsn) of the worker's slot, None if there is none."""
    rows = query(dsn, "SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots "
                      "WHERE slot_name = %s", (SLOT,))
    if not rows:
        return None
    active, confirmed = rows[0]
    return active, None if confirmed is None else parse_lsn(confirmed)


def checkpoint_lsn(dsn: str) -> int:
    (lsn,), = query(dsn, "SELECT lsn::text FROM slipstream.checkpoints WHERE slot = %s", (SLOT,))
    return parse_lsn(lsn)


def wal_insert_lsn(dsn: str) -> int:
    (lsn,), = query(dsn, "SELECT pg_current_wal_insert_lsn()::text")
    return parse_lsn(lsn)


class WorkerProcess:
    """`slipstream run --config ...` in the background; use as a context manager."""

    _count = 0

    def __init__(self, config: Path, *, cwd: Path, http: bool = False,
                 env: Mapping[str, str] | None = None) -> None:
        WorkerProcess._count += 1
        self.log_path = cwd / f"worker-{WorkerProcess._count}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()/kill()
        args = ["run", "--config", str(config), *([] if http else ["--no-http"])]
        self.proc = subprocess.Popen(command(*args), cwd=cwd, env=dict(env or environ()),
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the worker exited with {self.proc.returncode}:\n{self.output()}")

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            if predicate():
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}; worker output:\n{self.output()}")
            time.sleep(0.05)

    def wait_streaming(self, dsn: str, timeout: float = 30) -> None:
        """Until `run` has logged that it streams (a new slot is active during the copy too)."""
        self.wait_for("the worker to stream", lambda: (slot_row(dsn) or (False,))[0] and any(
            e.get("event") == "streaming" for e in self.events()), timeout)

    def wait_caught_up(self, dsn: str, timeout: float = 30) -> None:
        """Until the slot confirms everything written so far (as `Harness.wait_caught_up`)."""
        goal = wal_insert_lsn(dsn)

        def confirmed() -> bool:
            row = slot_row(dsn)
            return row is not None and row[1] is not None and row[1] >= goal
        self.wait_for(f"the slot to confirm {goal:X}", confirmed, timeout)

    def stop(self, timeout: float = 10) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds it took to exit)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the worker did not exit within {timeout}s of SIGTERM:\n"
                                 f"{self.output()}") from None
        self._log.close()
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
