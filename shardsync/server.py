"""The sync server: a Starlette app under /v1 that serves shards and change pages to devices.

Endpoints (every one but /healthz takes `Authorization: Bearer <device token>`):

* ``GET /v1/snapshot?partition=P&partition=Q&spaces=local`` — a fresh shard file of the
  partitions (default: all the token lists) with the requested spaces, exported from
  one snapshot; the header ``Slipstream-Cursor`` is the cursor it holds (also in
  ``meta.cursor``). gzip on the wire when the client accepts it.
* ``GET /v1/changes?partition=…&cursor=N&limit=M&spaces=…&live=true&wait=25`` — the
  next page after `cursor` (see `wire` for the JSON). With ``live=true`` and nothing
  to send, the request waits up to `wait` seconds for the worker's NOTIFY before
  answering (an empty page when nothing came).
* ``GET /healthz`` — 200 when the database answers and the LISTEN connection is up.

Metrics (`server_metrics`) are served on a port of their own, `metrics_port`, not on
the one devices reach.

Answers: 401 for a missing or unacceptable token, 403 for a partition the token does
not list (whether or not it exists — the body is the same), 400 for bad parameters
(the body says which and why), 410 ``resync_required`` for a cursor below the
compaction horizon and 409 ``resync_required`` for a cursor beyond the end of the log
(the server's log was reset): the device must take a new snapshot.

The server keeps no state of its own, so several can run behind a load balancer.
Requests query Postgres on psycopg's async connections (an `AsyncConnectionPool`); a
page is one statement (one snapshot, one round trip), and a large one is turned into
entries and encoded in a worker thread, off the event loop. A waiting long-poll holds
no database connection: one async LISTEN connection per process (`ChangeNotifier`)
wakes the waiters whose partitions changed. A snapshot comes from the process's
`SnapshotCache` (blocking: SQLite) in a worker thread, on a connection of its own: a
fresh `export_shard`, or the last one of the same partitions and spaces brought forward
by the change log; the header ``Slipstream-Snapshot`` says which (``export``,
``cached``, ``caught_up``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from slipstream.index.doc import IDENTIFIER
from slipstream.index.errors import ValidationError
from slipstream.index.pg_connect import pinned_conninfo
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .changelog import ChangeLog
from .errors import ResyncRequired
from .reader import MAX_LIMIT, Page, read_page_async
from .server_metrics import MetricsEndpoint, SyncMetrics
from .snapshot_cache import SnapshotCache
from .tokens import Grant, TokenError, TokenVerifier, check_partitions
from .wire import MEDIA_TYPE, accepts_gzip, encode_page, gzip_body

log = logging.getLogger("slipstream.sync")

CURSOR_HEADER = "Slipstream-Cursor"
SOURCE_HEADER = "Slipstream-Snapshot"
SHARD_MEDIA_TYPE = "application/vnd.sqlite3"
CHUNK = 1 << 20  # per read of a snapshot file (each one a hop to a worker thread)
SNAPSHOT_GZIP_LEVEL = 1  # fast: vectors barely compress, text does at any level
ENCODE_INLINE_ENTRIES = 64  # larger pages are encoded in a thread, off the event loop


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """How one `serve` process runs. `dsn` is the search database; `spaces` the default
    spaces of snapshots and pages when a request names none (None: every space);
    `snapshot_cache_bytes` bounds the exported shards kept to answer later snapshot
    requests (0: export every time), in a directory made under `tmp_dir`;
    `metrics_port` serves `/metrics` on `metrics_host` (0: not served)."""

    dsn: str
    verifier: TokenVerifier
    schema: str = "slipstream"
    spaces: tuple[str, ...] | None = None
    default_limit: int = 1000
    max_limit: int = 10_000
    max_wait: float = 60.0
    pool_min: int = 1
    pool_max: int = 8
    snapshot_cache_bytes: int = 1 << 30
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    tmp_dir: str | None = field(default=None)


class BadRequest(ValidationError):
    """A request parameter is not acceptable; the message names it and the fix."""


# -- the LISTEN fan-out -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Announced:
    """Changes with seq in (`after`, `upto`] touched `partitions` (None: unknown, maybe any)."""

    after: int
    upto: int
    partitions: frozenset[str] | None


class ChangeNotifier:
    """One LISTEN connection per process; waiters wake when their partitions change.

    On each NOTIFY (the log's new last seq) the notifier reads once which partitions
    the new entries touched, and wakes only the waiters reading one of them: a
    thousand idle devices cost no query when another tenant's row changes. `latest`
    is the highest seq announced. While the LISTEN connection is down, waiters re-read
    every `fallback_interval` seconds (polling) until it is back; at reconnect,
    whatever was missed is announced as touching every partition.
    """

    HISTORY = 4096

    def __init__(self, dsn: str, log_: ChangeLog, pool: AsyncConnectionPool,
                 fallback_interval: float = 1.0, heartbeat: float = 30.0) -> None:
        self.dsn, self.log, self.pool = dsn, log_, pool
        self.fallback_interval = fallback_interval
        # A LISTEN connection only receives: one a NAT or load balancer dropped without a
        # word would wait forever, devices learning of changes only as their long polls
        # time out. After `heartbeat` seconds without a notification it asks the server
        # for a row, which keeps such middleboxes from dropping it, and reconnects if no
        # answer comes within `heartbeat` seconds more.
        self.heartbeat = heartbeat
        self.latest = 0
        self.connected = False
        self._history: deque[Announced] = deque(maxlen=self.HISTORY)
        self._event = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()

    def announce(self, upto: int, partitions: frozenset[str] | None) -> None:
        if upto > self.latest:
            self._history.append(Announced(self.latest, upto, partitions))
            self.latest = upto
        event, self._event = self._event, asyncio.Event()
        event.set()

    def concerns(self, seq: int, partitions: Sequence[str]) -> bool:
        """Whether a change after `seq` may touch one of `partitions`."""
        if self.latest <= seq:
            return False
        if not self._history or self._history[0].after > seq:
            return True  # that far back is no longer remembered
        for a in reversed(self._history):
            if a.upto <= seq:
                break
            if a.partitions is None or not a.partitions.isdisjoint(partitions):
                return True
        return False

    async def wait_beyond(self, seq: int, partitions: Sequence[str], timeout: float) -> bool:
        """Wait until a change after `seq` may touch `partitions` (True), or `timeout` (False).
        Without a LISTEN connection, returns True every `fallback_interval` (poll)."""
        deadline = time.monotonic() + timeout
        while not self.concerns(seq, partitions):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if not self.connected:
                remaining = min(remaining, self.fallback_interval)
            try:
                await asyncio.wait_for(self._event.wait(), remaining)
            except TimeoutError:
                if not self.connected and time.monotonic() < deadline:
                    return True
        return True

    async def _touched(self, after: int, upto: int) -> frozenset[str]:
        async with self.pool.connection() as conn:
            return await self.log.partitions_between_async(conn, after, upto)

    async def _on_notify(self, payload: str) -> None:
        try:
            upto = int(payload)
        except ValueError:
            upto = self.latest + 1
        if upto <= self.latest:
            return
        try:
            touched: frozenset[str] | None = await self._touched(self.latest, upto)
        except Exception as exc:  # noqa: BLE001 - waking everyone is always safe
            log.warning("sync: cannot read which partitions changed (%s); waking every device",
                        exc)
            touched = None
        self.announce(upto, touched)

    async def max_seq(self) -> int:
        async with self.pool.connection() as conn:
            return await self.log.max_seq_async(conn)

    async def run(self) -> None:
        delay = 0.1
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self.dsn, autocommit=True, connect_timeout=10) as conn:
                    await conn.execute(f'LISTEN "{self.log.channel}"')
                    self.connected = True
                    missed = await self.max_seq()
                    self.announce(missed, None)  # while down: maybe anything
                    self._ready.set()
                    delay = 0.1
                    while True:
                        async for note in conn.notifies(timeout=self.heartbeat):
                            await self._on_notify(note.payload)
                        await self._beat(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the connection dropped: poll, reconnect
                log.warning("sync LISTEN connection lost (%s); reconnecting in %.1fs", exc, delay)
            self.connected = False
            self._ready.set()
            self.announce(self.latest, None)  # wake waiters into polling mode
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _beat(self, conn: psycopg.AsyncConnection) -> None:
        """One round trip on the LISTEN connection, or `ConnectionError` if none within
        `heartbeat` seconds. The connection is closed before its query is abandoned:
        cancelling the query would send a cancel request and wait out its time limit."""
        beat = asyncio.ensure_future(conn.execute("SELECT 1"))
        done, _ = await asyncio.wait({beat}, timeout=self.heartbeat)
        if beat in done:
            beat.result()
            return
        await conn.close()
        beat.cancel()
        await asyncio.wait({beat}, timeout=1.0)
        if beat.done() and not beat.cancelled():
            beat.exception()  # retrieved: the connection's end is the error to report
        raise ConnectionError(f"no answer to a heartbeat within {self.heartbeat:g} s")

    async def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="slipstream-sync-listen")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), 10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


# -- request parsing ----------------------------------------------------------------------

def _error(status: int, code: str, message: str | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"error": code}
    if message:
        body["message"] = message
    body.update(extra)
    headers = {"cache-control": "no-store"}
    if status == 401:
        headers["www-authenticate"] = 'Bearer error="invalid_token"'
    return JSONResponse(body, status_code=status, headers=headers)


_UNAVAILABLE = (psycopg.OperationalError, PoolTimeout)


def _unavailable(exc: BaseException) -> JSONResponse:
    log.warning("sync: database unavailable: %s", exc)
    response = _error(503, "unavailable", "the search database is not answering; retry later")
    response.headers["retry-after"] = "2"
    return response


UNAUTHORIZED = ("unauthorized",
                "the bearer token is missing or not acceptable; get a new device token")
FORBIDDEN = ("forbidden", "this token does not grant the requested partition(s)")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _int(request: Request, name: str, default: int | None, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        if default is None:
            raise BadRequest(f"{name} is required (an integer from {lo} to {hi})")
        return default
    if not re.fullmatch(r"\d{1,19}", raw):
        raise BadRequest(f"{name}={raw!r} is not an integer; give one from {lo} to {hi}")
    value = int(raw)
    if not lo <= value <= hi:
        raise BadRequest(f"{name}={value} is out of range; give one from {lo} to {hi}")
    return value


def _bool(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "false").lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no", ""):
        return False
    raise BadRequest(f"{name}={raw!r} is not a boolean; use true or false")


def _spaces(request: Request, default: Sequence[str] | None) -> tuple[str, ...] | None:
    values = request.query_params.getlist("spaces")
    if not values:
        return None if default is None else tuple(default)
    names = [s.strip() for v in values for s in v.split(",") if s.strip()]
    for s in names:
        if not IDENTIFIER.match(s):
            raise BadRequest(f"spaces: {s!r} is not a space name (letters, digits, _)")
    return tuple(dict.fromkeys(names))


class _Denied(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


def _authorize(request: Request, verifier: TokenVerifier) -> tuple[Grant, tuple[str, ...]]:
    """The grant and the partitions asked for (default: all the token's), or _Denied."""
    try:
        grant = verifier.verify(_bearer(request))
    except TokenError as exc:
        log.info("sync request refused: %s (%s %s)", exc.reason, request.method, request.url.path)
        raise _Denied(_error(401, *UNAUTHORIZED)) from None
    asked = request.query_params.getlist("partition")
    if not asked:
        return grant, tuple(sorted(grant.partitions))
    try:
        partitions = check_partitions(asked, "partition")
    except ValidationError as exc:
        raise _Denied(_error(400, "bad_request", str(exc))) from None
    if not grant.allows(partitions):
        raise _Denied(_error(403, *FORBIDDEN))
    return grant, partitions


# -- the app ------------------------------------------------------------------------------

class SyncServer:
    """The endpoints, with the pool and the notifier they share."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.log = ChangeLog(settings.schema)
        self.pool: AsyncConnectionPool | None = None
        self.notifier: ChangeNotifier | None = None
        self.snapshots: SnapshotCache | None = None
        self.metrics = SyncMetrics()
        self.metrics_endpoint: MetricsEndpoint | None = None
        self._inflight: dict[tuple, asyncio.Future] = {}
        self._exports = asyncio.Semaphore(max(1, settings.pool_max // 2))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        s = self.settings
        dsn = pinned_conninfo(s.dsn)  # ISO dates whatever the database sets
        self.pool = AsyncConnectionPool(dsn, min_size=s.pool_min, max_size=s.pool_max,
                                        open=False, kwargs={"autocommit": True},
                                        name="slipstream-sync")
        await self.pool.open(wait=True, timeout=30.0)
        self.notifier = ChangeNotifier(dsn, self.log, self.pool)
        await self.notifier.start()
        self.snapshots = SnapshotCache(dsn, s.schema, s.snapshot_cache_bytes, s.tmp_dir)
        self.metrics.watch_cache(self.snapshots.bytes)
        if s.metrics_port:
            self.metrics_endpoint = self.metrics.serve(s.metrics_host, s.metrics_port)
        try:
            yield
        finally:
            if self.metrics_endpoint is not None:
                self.metrics_endpoint.stop()
            self.snapshots.close()
            await self.notifier.stop()
            await self.pool.close()

    # -- database work ------------------------------------------------------------------

    async def _page(self, partitions, cursor, limit, spaces) -> Page:
        assert self.pool is not None
        async with self.pool.connection() as conn:
            read = await read_page_async(conn, self.settings.schema, partitions, cursor, limit,
                                         spaces)
        if not read.page.entries and cursor > read.end:
            raise _Ahead(cursor, read.end)
        return read.page

    # -- endpoints ----------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        ok = self.notifier is not None and self.notifier.connected
        try:
            await self.notifier.max_seq()  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - any failure: not healthy
            ok = False
        return JSONResponse({"ok": ok, "listening": bool(self.notifier and self.notifier.connected)},
                            status_code=200 if ok else 503)

    async def changes(self, request: Request) -> Response:
        s = self.settings
        try:
            _, partitions = _authorize(request, s.verifier)
            cursor = _int(request, "cursor", None, 0, 2**63 - 1)
            limit = _int(request, "limit", s.default_limit, 1, min(s.max_limit, MAX_LIMIT))
            spaces = _spaces(request, s.spaces)
            live = _bool(request, "live")
            wait = _int(request, "wait", int(min(25, s.max_wait)), 0, int(s.max_wait)) if live else 0
        except _Denied as denied:
            return denied.response
        except BadRequest as exc:
            return _error(400, "bad_request", str(exc))
        assert self.notifier is not None
        key = (partitions, cursor, limit, spaces)
        deadline = time.monotonic() + wait
        try:
            while True:
                answer = await self._shared_read(key)
                page = answer.page
                remaining = deadline - time.monotonic()
                if page.entries or page.has_more or remaining <= 0:
                    break
                self.metrics.long_polls.inc()
                try:
                    woken = await self.notifier.wait_beyond(page.next_cursor, partitions, remaining)
                finally:
                    self.metrics.long_polls.dec()
                if not woken:
                    break
        except ResyncRequired as exc:
            return _error(410, "resync_required", str(exc), horizon=exc.horizon, cursor=exc.cursor)
        except _Ahead as exc:
            return _error(409, "resync_required", str(exc), cursor=exc.cursor, end=exc.end)
        except ValidationError as exc:
            return _error(400, "bad_request", str(exc))
        except _UNAVAILABLE as exc:
            return _unavailable(exc)
        headers = {CURSOR_HEADER: str(page.next_cursor), "cache-control": "no-store",
                   "vary": "accept-encoding"}
        body = answer.body
        if answer.gzipped is not None and accepts_gzip(request.headers.get("accept-encoding")):
            body, headers["content-encoding"] = answer.gzipped, "gzip"
        return Response(body, media_type=MEDIA_TYPE, headers=headers)

    async def _shared_read(self, key: tuple) -> _Answer:
        """Read and encode one page; identical requests in flight at once share one read
        (a thousand devices of one partition woken by one change cost one query)."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._answer(*key))
            self._inflight[key] = task
            task.add_done_callback(lambda t: (self._inflight.pop(key, None),
                                              t.cancelled() or t.exception()))
        return await asyncio.shield(task)

    async def _answer(self, partitions, cursor, limit, spaces) -> _Answer:
        page = await self._page(partitions, cursor, limit, spaces)
        if len(page.entries) <= ENCODE_INLINE_ENTRIES:
            return _encoded(page)
        return await run_in_threadpool(_encoded, page)

    async def snapshot(self, request: Request) -> Response:
        s = self.settings
        try:
            _, partitions = _authorize(request, s.verifier)
            spaces = _spaces(request, s.spaces)
        except _Denied as denied:
            return denied.response
        except BadRequest as exc:
            return _error(400, "bad_request", str(exc))
        assert self.snapshots is not None
        try:
            async with self._exports:
                started = time.monotonic()
                snap = await run_in_threadpool(self.snapshots.snapshot, partitions, spaces)
        except ValidationError as exc:
            return _error(400, "bad_request", str(exc))
        except _UNAVAILABLE as exc:
            return _unavailable(exc)
        self.metrics.snapshots.labels(snap.source).inc()
        self.metrics.snapshot_seconds.labels(snap.source).observe(time.monotonic() - started)
        gzip_ok = accepts_gzip(request.headers.get("accept-encoding"))
        headers = {CURSOR_HEADER: str(snap.cursor), SOURCE_HEADER: snap.source,
                   "cache-control": "no-store", "slipstream-shard-bytes": str(snap.size),
                   "vary": "accept-encoding"}
        if gzip_ok:
            headers["content-encoding"] = "gzip"
        else:
            headers["content-length"] = str(snap.size)
        # _file_chunks closes the file; the cache replaces files by rename, never in place
        return StreamingResponse(_file_chunks(snap.file, gzip_ok), media_type=SHARD_MEDIA_TYPE,
                                 headers=headers)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/healthz", self._counted("healthz", self.healthz)),
            Route("/v1/changes", self._counted("changes", self.changes)),
            Route("/v1/snapshot", self._counted("snapshot", self.snapshot)),
        ], lifespan=self.lifespan)

    def _counted(self, endpoint: str, handler):
        """`handler`, counting its answers by status code (500 for an error it raises)."""
        async def counted(request: Request) -> Response:
            try:
                response = await handler(request)
            except BaseException:
                self.metrics.requests.labels(endpoint, "500").inc()
                raise
            self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
            return response
        return counted


@dataclass(frozen=True, slots=True)
class _Answer:
    page: Page
    body: bytes
    gzipped: bytes | None


def _encoded(page: Page) -> _Answer:
    body = encode_page(page)
    return _Answer(page, body, gzip_body(body))


class _Ahead(Exception):
    def __init__(self, cursor: int, end: int) -> None:
        self.cursor, self.end = cursor, end
        super().__init__(f"cursor {cursor} is beyond the end of the change log ({end}): the "
                         "server's log was reset or restored; take a new snapshot")


async def _file_chunks(f: BinaryIO, compress: bool) -> AsyncIterator[bytes]:
    z = zlib.compressobj(SNAPSHOT_GZIP_LEVEL, zlib.DEFLATED, 31) if compress else None
    with f:
        while True:
            chunk = await run_in_threadpool(f.read, CHUNK)
            if not chunk:
                break
            if z is None:
                yield chunk
            else:
                out = await run_in_threadpool(z.compress, chunk)
                if out:
                    yield out
    if z is not None:
        yield z.flush()


def create_app(settings: ServerSettings) -> Starlette:
    """The ASGI app for `settings` (run it with uvicorn, or `slipstream serve`)."""
    return SyncServer(settings).app()
