"""`/metrics`, `/healthz` and `/readyz` over HTTP, for one worker or sync server.

This module owns `HealthServer`: a stdlib threaded HTTP server on a daemon thread,
started and stopped explicitly (nothing binds a port at import time), and
`HealthServerError`, the typed error for a port that cannot be bound.
"""

from __future__ import annotations

import json as _json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST
from slipstream.index.errors import SlipstreamError, ValidationError

from .logs import get_logger
from .metrics import Metrics

__all__ = ["HealthServer", "HealthServerError"]


def _log() -> Any:
    # A fresh proxy per (rare) event rather than a module-level logger: a cached
    # module-level logger would freeze whatever configuration was active at its first
    # use, even one from before configure_logging().
    return get_logger(__name__)


# --- the server ----------------------------------------------------

Check = Callable[[], tuple[bool, str]]


class HealthServerError(SlipstreamError):
    """The health server could not bind its port, or was used before `start()`."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # seconds a client may take to send its request before we hang up
    server_version = "slipstream"

    def do_GET(self) -> None:  # http.server's naming
        app = self.server.app
        path = urlsplit(self.path).path
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, app.metrics.render())
        elif path == "/healthz":
            ok, reason = app.alive()
            self._send(200 if ok else 503, "text/plain; charset=utf-8", (reason + "\n").encode())
        elif path == "/readyz":
            ok, reason = app.ready()
            body = _json.dumps({"ready": ok, "reason": reason}).encode()
            self._send(200 if ok else 503, "application/json", body)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # stdlib's signature
        _log().debug("health_http", client=self.client_address[0], message=format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: HealthServer) -> None:
        self.app = app
        super().__init__(address, _Handler)


class HealthServer:
    """`GET /metrics`, `/healthz` and `/readyz` for one worker, on a daemon thread.

    Liveness is the `liveness` callable when given; otherwise a heartbeat: the worker's
    loop calls `beat()` each turn, and `/healthz` answers 503 once no beat has come for
    `stale_after` seconds (the clock starts at construction, so a slow start-up is
    alive until then). Readiness is `readiness()`; `(False, reason)` or an exception
    gives 503 and `{"ready": false, "reason": ...}`.

    `port=0` binds a free port; `.port` tells which after `start()`.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        readiness: Check,
        liveness: Check | None = None,
        stale_after: float = 60.0,
    ) -> None:
        if stale_after <= 0:
            raise ValidationError(f"stale_after must be > 0 seconds, not {stale_after!r}")
        self.metrics = metrics
        self.host, self._requested_port = host, port
        self._readiness, self._liveness = readiness, liveness
        self.stale_after = stale_after
        self._last_beat = time.monotonic()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """The worker's loop is alive; call it at least every `stale_after` seconds."""
        self._last_beat = time.monotonic()

    def alive(self) -> tuple[bool, str]:
        if self._liveness is not None:
            return _run_check(self._liveness, "liveness")
        silent = time.monotonic() - self._last_beat
        if silent > self.stale_after:
            return False, f"no heartbeat for {silent:.1f}s (stale after {self.stale_after:g}s)"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        return _run_check(self._readiness, "readiness")

    @property
    def port(self) -> int:
        if self._server is None:
            raise HealthServerError("the health server is not started; call start() first")
        return self._server.server_address[1]

    def start(self) -> Self:
        if self._server is not None:
            return self
        try:
            server = _Server((self.host, self._requested_port), self)
        except OSError as exc:
            raise HealthServerError(
                f"cannot serve health and metrics on {self.host}:{self._requested_port}: "
                f"{exc.strerror or exc}; choose a free port (0 picks one)"
            ) from exc
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"slipstream-health:{self.port}",
            daemon=True,
        )
        self._thread.start()
        _log().info("health_server_started", host=self.host, port=self.port)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _run_check(check: Check, what: str) -> tuple[bool, str]:
    """A probe's answer; a probe that raises counts as failing, with the error as reason."""
    try:
        ok, reason = check()
    except Exception as exc:  # noqa: BLE001 - a broken probe means not ready, not a crash
        _log().warning(f"{what}_check_failed", error=repr(exc))
        return False, f"{what} check raised {type(exc).__name__}: {exc}"
    return bool(ok), str(reason)
