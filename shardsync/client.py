"""The device side of sync, on httpx: keep a local shard file an exact, current copy.

`SyncClient(url, token, path).sync()` brings the shard at `path` up to date:

* no shard yet: download ``/v1/snapshot`` into a temporary file beside `path`, check
  it opens as a shard, then rename it over `path` (atomic; a crash leaves no shard or
  the old one, never half a file);
* then pull ``/v1/changes`` from the shard's cursor, one page at a time, each applied
  in one SQLite transaction (`apply_page`), until the server has nothing more.

`follow()` keeps going with long-polls (``live=true``) until stopped. When the server
answers ``resync_required`` (the cursor is older than the compaction horizon), the
client downloads a new snapshot into a new file and swaps it in atomically; the old
shard stays complete and searchable until the rename (`on_swap` is called just before
it, for the app to close its connections to the old shard and reopen after). Transient failures (the network,
5xx, 429) are retried with exponential backoff by a retry policy (`decide(exc, attempt)`,
the same interface as the worker's); refusals (401, 403, 400) are raised at once.

`sync(url, token, path)` is the one-call form. Every run resumes where the last one
stopped: the cursor lives in the shard, and a download cut short is started again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
from slipstream.index import SQLiteBackend
from slipstream.index.errors import SlipstreamError

from .errors import ResyncRequired, ShardFormatError, ShardPathError
from .retry import Decision, RetryPolicy, decide_by_table
from .shard import apply_page, open_shard, shard_cursor, shard_partitions
from .wire import WireFormatError, decode_page

log = logging.getLogger("slipstream.sync.client")

CURSOR_HEADER = "Slipstream-Cursor"
DOWNLOAD_SUFFIX = ".download"


class SyncConnectionError(SlipstreamError, ConnectionError):
    """The sync server could not be reached or answered with a transient failure (5xx,
    429, a cut connection); retrying later can succeed."""


class _Stopped(Exception):
    """`stop()` was called while a request was failing: return, do not raise."""


class SyncRefusedError(SlipstreamError):
    """The sync server refused the request (401, 403, 400, 404); the message says why.
    Retrying the same request cannot succeed: get a new token or fix the parameters."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


DECISIONS: dict[type[BaseException], Decision] = {
    SyncConnectionError: "retry",
    WireFormatError: "stop",  # the server speaks another protocol version
    SyncRefusedError: "stop",
}


@dataclass(frozen=True, slots=True)
class SyncRetryPolicy(RetryPolicy):
    """The project's retry policy with the sync client's table: transport failures and
    503s are retried, refusals are not. Gives up after 8 failures in a row by default."""

    initial_delay: float = 0.2
    max_delay: float = 15.0
    max_attempts: int | None = 8

    def classify(self, exc: BaseException) -> Decision:
        return decide_by_table(exc, DECISIONS)


@dataclass(frozen=True, slots=True)
class SyncReport:
    """What one `sync()` did: the cursor reached, pages and entries applied, and whether
    it downloaded a snapshot (first run) or resynced (cursor older than the horizon)."""

    cursor: int
    pages: int = 0
    entries: int = 0
    snapshot: bool = False
    resynced: bool = False
    retries: int = 0


def _refusal(response: httpx.Response) -> SyncRefusedError:
    try:
        body = response.json()
        detail = body.get("message") or body.get("error") or ""
    except ValueError:
        detail = response.text[:200]
    hint = {401: " (get a new device token)", 403: " (the token does not list that partition)"}
    return SyncRefusedError(response.status_code, f"sync server refused {response.request.url.path}"
                            f" with {response.status_code}: {detail}"
                            f"{hint.get(response.status_code, '')}")


def _check(response: httpx.Response) -> None:
    status = response.status_code
    if status < 300:
        return
    response.read()
    if status in (409, 410):
        try:
            body = response.json()
        except ValueError:
            body = {}
        if body.get("error") == "resync_required":
            raise ResyncRequired(int(body.get("cursor", 0)), int(body.get("horizon", 0)))
    if status == 429 or status >= 500:
        raise SyncConnectionError(f"sync server answered {status}; retrying")
    raise _refusal(response)


class SyncClient:
    """Syncs one shard file from one server with one token. Not for concurrent use."""

    def __init__(self, url: str, token: str, path: str | os.PathLike[str], *,
                 partitions: Sequence[str] | None = None, spaces: Sequence[str] | None = None,
                 limit: int = 1000, retry: object | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None,
                 compress_snapshot: bool = True) -> None:
        self.url = url.rstrip("/")
        self.path = Path(path)
        self.partitions = tuple(partitions) if partitions else ()
        self.spaces = None if spaces is None else tuple(spaces)
        self.limit = limit
        self.retry = retry if retry is not None else SyncRetryPolicy()
        self.timeout = timeout
        # gzip halves a snapshot on the wire but costs the server ~20 ns a byte; on a fast
        # link (a LAN, the same host) the file arrives sooner uncompressed.
        self.compress_snapshot = compress_snapshot
        self._http = httpx.Client(headers={"authorization": f"Bearer {token}"},
                                  timeout=httpx.Timeout(timeout, connect=10.0),
                                  transport=transport)
        self._stop = threading.Event()
        # Called just before a resync's new file replaces the old shard at `path`. SQLite
        # names a shard's WAL files after its path, so a connection to the old shard must
        # be closed here (and the shard reopened after), not kept across the swap.
        self.on_swap: Callable[[Path], None] | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop(self) -> None:
        """Ask `sync(live=True)` to return after the request in flight."""
        self._stop.set()

    # -- the retry loop -----------------------------------------------------------------

    def _retrying(self, step: Callable[[], object], counter: list[int]) -> object:
        attempt = 0
        while True:
            try:
                return step()
            except httpx.UnsupportedProtocol as exc:
                raise SyncRefusedError(0, f"cannot reach {self.url}: {exc}") from exc
            except (httpx.TransportError, httpx.DecodingError) as exc:
                error: BaseException = SyncConnectionError(
                    f"connection to {self.url} failed: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
            except SyncConnectionError as exc:
                error = exc
            if self._stop.is_set():
                raise _Stopped from error
            decision = self.retry.decide(error, attempt)  # type: ignore[attr-defined]
            if decision.action != "retry":
                raise error
            log.info("sync retry %d in %.2fs: %s", attempt + 1, decision.delay, decision.reason)
            counter[0] += 1
            attempt += 1
            if self._stop.wait(decision.delay):
                raise _Stopped from error

    # -- snapshot -----------------------------------------------------------------------

    def _params(self) -> list[tuple[str, str]]:
        params = [("partition", p) for p in self.partitions]
        if self.spaces is not None:
            params.append(("spaces", ",".join(self.spaces)))
        return params

    def _download(self) -> Path:
        """Fetch a snapshot into a new temporary file beside `path`; returns that file."""
        tmp = self.path.with_name(f"{self.path.name}{DOWNLOAD_SUFFIX}-{uuid.uuid4().hex[:8]}")
        try:
            encoding = "gzip" if self.compress_snapshot else "identity"
            with self._http.stream("GET", f"{self.url}/v1/snapshot", params=self._params(),
                                   headers={"accept-encoding": encoding},
                                   timeout=httpx.Timeout(self.timeout, connect=10.0,
                                                         read=max(self.timeout, 300.0))) as r:
                _check(r)
                try:
                    with open(tmp, "wb") as f:
                        f.writelines(r.iter_bytes(256 * 1024))
                        f.flush()
                        os.fsync(f.fileno())
                except OSError as exc:
                    raise ShardPathError(f"cannot write the shard {self.path}: {exc.strerror or exc} "
                                         f"({tmp}); give it a directory that exists, is writable and "
                                         "has room for the snapshot") from exc
            shard = open_shard(tmp)  # refuses anything that is not a readable shard
            try:
                if self.spaces is None:
                    self.spaces = _shard_spaces(shard)
            finally:
                _close(shard)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return tmp

    def _install(self, tmp: Path) -> None:
        if self.on_swap is not None and self.path.exists():
            self.on_swap(self.path)  # the app closes its connections to the old shard now
        try:
            os.replace(tmp, self.path)  # atomic: readers see the old shard or the new, whole
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ShardPathError(f"cannot put the new shard in place at {self.path}: "
                                 f"{exc.strerror or exc}") from exc
        with contextlib.suppress(OSError):
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _clear_downloads(self) -> None:
        for stale in self.path.parent.glob(f"{self.path.name}{DOWNLOAD_SUFFIX}-*"):
            with contextlib.suppress(OSError):
                stale.unlink()

    # -- deltas -------------------------------------------------------------------------

    def _pull(self, shard: SQLiteBackend, *, live: bool, wait: float) -> tuple[int, int, bool]:
        """One GET /v1/changes from the shard's cursor, applied. (entries, cursor, has_more)."""
        cursor = _cursor(shard)
        params = self._params() + [("cursor", str(cursor)), ("limit", str(self.limit))]
        timeout = httpx.Timeout(self.timeout, connect=10.0)
        if live:
            params += [("live", "true"), ("wait", str(int(wait)))]
            timeout = httpx.Timeout(self.timeout + wait, connect=10.0)
        response = self._http.get(f"{self.url}/v1/changes", params=params, timeout=timeout)
        _check(response)
        page = decode_page(response.content)
        if page.since is not None and page.since != cursor:
            raise WireFormatError(f"the server answered for cursor {page.since}, not {cursor}")
        apply_page(shard, page)
        return len(page.entries), page.next_cursor, page.has_more

    def _open(self) -> SQLiteBackend:
        """The shard; later requests ask for exactly its partitions and spaces."""
        shard = open_shard(self.path)
        if self.spaces is None:
            self.spaces = _shard_spaces(shard)
        if not self.partitions:
            self.partitions = tuple(shard_partitions(shard) or ())
        return shard

    def sync(self, *, live: bool = False, wait: float = 25.0,
             on_page: Callable[[int, int], None] | None = None) -> SyncReport:
        """Bring the shard up to date (`live`: and keep it so until `stop()`).

        `on_page(entries, cursor)` is called after each applied page.
        """
        counter = [0]
        pages = entries = 0
        snapshot = resynced = False
        if not self.path.exists():
            self._clear_downloads()
            try:
                self._install(self._retrying(self._download, counter))  # type: ignore[arg-type]
            except _Stopped as stopped:
                raise SyncConnectionError("stopped before the first snapshot arrived") from stopped
            snapshot = True
        shard = self._open()
        more = True  # catch up with plain requests first; long-poll only once caught up
        try:
            while not self._stop.is_set():
                try:
                    try:
                        n, cursor, more = self._retrying(  # type: ignore[misc]
                            partial(self._pull, shard, live=live and not more, wait=wait),
                            counter)
                    except ResyncRequired as exc:
                        log.warning("sync: %s", exc)
                        tmp = self._retrying(self._download, counter)  # old shard stays open
                        _close(shard)
                        self._install(tmp)  # type: ignore[arg-type]
                        shard = self._open()
                        resynced, more = True, True
                        continue
                except _Stopped:
                    break
                pages += 1
                entries += n
                if on_page is not None:
                    on_page(n, cursor)
                if not more and not live:
                    break
            return SyncReport(_cursor(shard), pages, entries, snapshot, resynced, counter[0])
        finally:
            _close(shard)


def _shard_spaces(shard: SQLiteBackend) -> tuple[str, ...]:
    return tuple(sorted(shard.spaces))


def _cursor(shard: SQLiteBackend) -> int:
    cursor = shard_cursor(shard)
    if cursor is None:
        raise ShardFormatError(f"{shard.path} has no sync cursor: it was not made by a "
                               "snapshot; move it away and sync again to download one")
    return cursor


def _close(shard: SQLiteBackend) -> None:
    shard.close()


def sync(url: str, token: str, path: str | os.PathLike[str], *, live: bool = False,
         partitions: Sequence[str] | None = None, spaces: Sequence[str] | None = None,
         wait: float = 25.0, retry: object | None = None) -> SyncReport:
    """Bring the shard at `path` up to date from the sync server at `url` (see `SyncClient`)."""
    with SyncClient(url, token, path, partitions=partitions, spaces=spaces, retry=retry) as client:
        return client.sync(live=live, wait=wait)


__all__ = [
    "ShardFormatError",
    "ShardPathError",
    "SyncClient",
    "SyncConnectionError",
    "SyncRefusedError",
    "SyncReport",
    "SyncRetryPolicy",
    "sync",
]
