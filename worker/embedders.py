"""Server-side embedders: an OpenAI-compatible HTTP client, and building embedders from config.

`HttpEmbedder` posts to a ``/embeddings`` endpoint (OpenAI, vLLM, TEI, Ollama and the
other servers that copy its API) the way a rate-limited service likes:

* batches bounded by item count (`batch_size`) and by an estimated token budget
  (`max_batch_tokens`); a text over the model's input limit (`max_input_tokens`) is
  cut to it, with a warning and a metric;
* up to `concurrency` requests in flight (threads sharing one connection pool);
* retries on 429, 5xx, timeouts and lost connections, with jittered backoff that
  honours ``Retry-After``, decided by the worker's one `RetryPolicy`, within a
  per-call wait budget so an outage never holds the stream for long;
* a `CircuitBreaker` per service: after repeated failures no request goes out until a
  later probe succeeds; meanwhile calls fail at once and rows stay pending;
* the ``dimensions`` request parameter when configured;
* a batch refused for its content (400, 413, 422) is halved until only the texts the
  service refuses fail, so one bad row does not hold back the rows sent with it.

Any failure raises an `EmbeddingError`; the index then keeps the rows lexical-only
and pending, and the fill pass embeds them later. The API key lives only in the
HTTP client's headers: it is in no message, log line or repr.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from typing import Any

import numpy as np
from slipstream.index import Embedder, HashingEmbedder

from .breaker import STATE_VALUES, CircuitBreaker, State
from .config import EmbedderConfig, _redact_url
from .errors import (
    EmbeddingCircuitOpenError,
    EmbeddingError,
    EmbeddingRejectedError,
    EmbeddingTransientError,
    RetryPolicy,
)

__all__ = ["EmbeddingError", "HttpEmbedder", "build_embedders", "estimate_tokens", "plan_batches"]

log = logging.getLogger("slipstream.embed")

SPLIT_STATUSES = frozenset({400, 413, 422})  # a request refused for its content, not for auth
BYTES_PER_TOKEN = 3  # a cautious estimate: English runs near 4 bytes a token, other scripts less


def estimate_tokens(text: str) -> int:
    """A cautious token estimate from the UTF-8 length (no tokenizer needed)."""
    return max(1, math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN))


def truncate(text: str, max_tokens: int) -> str:
    """`text` cut (on a character boundary) to at most `max_tokens` estimated tokens."""
    limit = max_tokens * BYTES_PER_TOKEN
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def plan_batches(tokens: Sequence[int], max_items: int, max_tokens: int) -> list[tuple[int, int]]:
    """Cut positions [start, end) so that each batch has at most `max_items` texts and at
    most `max_tokens` estimated tokens (a single text over the budget goes alone)."""
    out: list[tuple[int, int]] = []
    start, used = 0, 0
    for i, n in enumerate(tokens):
        if i > start and (i - start >= max_items or used + n > max_tokens):
            out.append((start, i))
            start, used = i, 0
        used += n
    if start < len(tokens):
        out.append((start, len(tokens)))
    return out


class PartialEmbeddingError(EmbeddingError):
    """Some batches of a call failed. `vectors` holds the rows that did succeed, where
    `done` is True; the index keeps those and leaves the others pending."""

    def __init__(self, message: str, vectors: np.ndarray, done: np.ndarray) -> None:
        super().__init__(message)
        self.vectors, self.done = vectors, done


class HttpEmbedder:
    """POST {url}/embeddings with {"model", "input": [...]} (and "dimensions" if set)."""

    def __init__(self, url: str, model: str, dim: int, *, api_key: str | None = None,
                 batch_size: int = 64, timeout: float = 30.0, concurrency: int = 1,
                 max_batch_tokens: int = 100_000, max_input_tokens: int = 8191,
                 dimensions: int | None = None, retry: RetryPolicy | None = None,
                 retry_budget_seconds: float = 10.0, breaker: CircuitBreaker | None = None,
                 space: str = "default", metrics: Any = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        import httpx

        self.url = url.rstrip("/") + "/embeddings"
        self.safe_url = _redact_url(self.url)
        self.model, self.dim, self.batch_size = model, dim, batch_size
        self.concurrency = max(1, concurrency)
        self.max_batch_tokens, self.max_input_tokens = max_batch_tokens, max_input_tokens
        self.dimensions = dimensions
        self.retry = retry or RetryPolicy(initial_delay=0.5, max_delay=8.0, max_attempts=5)
        self.retry_budget_seconds = retry_budget_seconds
        self.space, self.metrics, self._sleep = space, metrics, sleep
        self.breaker = breaker or CircuitBreaker()
        self.breaker.on_change = self._breaker_changed
        self.embedder_id = f"http:{model}:{dim}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._httpx = httpx
        self._client = httpx.Client(timeout=timeout, headers=headers, limits=httpx.Limits(
            max_connections=self.concurrency, max_keepalive_connections=self.concurrency))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        if metrics is not None:
            metrics.embed_circuit_state.labels(space=space).set(STATE_VALUES["closed"])

    def __repr__(self) -> str:
        return (f"HttpEmbedder(url={self.safe_url!r}, model={self.model!r}, dim={self.dim}, "
                f"concurrency={self.concurrency})")

    # -- the Embedder protocol ------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        fitted = [self._fit(t) for t in texts]
        tokens = [estimate_tokens(t) for t in fitted]
        batches = plan_batches(tokens, self.batch_size, self.max_batch_tokens)
        out = np.zeros((len(fitted), self.dim), dtype=np.float32)
        done = np.zeros(len(fitted), dtype=bool)
        deadline = time.monotonic() + self.retry_budget_seconds

        def run(span: tuple[int, int]) -> BaseException | None:
            start, end = span
            try:
                out[start:end] = self._request(fitted[start:end], sum(tokens[start:end]), deadline)
                done[start:end] = True
                return None
            except EmbeddingRejectedError as exc:
                if end - start > 1 and exc.status in SPLIT_STATUSES:
                    # one bad text fails its whole request: halve it, so only that text fails
                    mid = (start + end) // 2
                    return next((e for e in (run((start, mid)), run((mid, end))) if e), None)
                return exc
            except EmbeddingError as exc:
                return exc

        if self.concurrency == 1 or len(batches) == 1:
            errors = [run(b) for b in batches]
        else:
            errors = list(self._executor().map(run, batches))
        failed = [e for e in errors if e is not None]
        if not failed:
            return out
        first = failed[0]
        if done.any():
            raise PartialEmbeddingError(
                f"{len(failed)} of {len(batches)} embedding requests failed: {first}",
                out, done) from first
        raise first

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._client.close()

    # -- pieces ---------------------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="slipstream-embed")
            return self._pool

    def _fit(self, text: str) -> str:
        if estimate_tokens(text) <= self.max_input_tokens:
            return text
        if self.metrics is not None:
            self.metrics.embed_truncations_total.labels(space=self.space).inc()
        log.warning("embedding text of about %d tokens cut to the model's limit of %d (space %s)",
                    estimate_tokens(text), self.max_input_tokens, self.space)
        return truncate(text, self.max_input_tokens)

    def _count(self, name: str, n: float = 1, **labels: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).labels(space=self.space, **labels).inc(n)

    def _breaker_changed(self, state: State) -> None:
        log.warning("embedding service %s: circuit %s (space %s)", self.safe_url, state, self.space)
        if self.metrics is not None:
            self.metrics.embed_circuit_state.labels(space=self.space).set(STATE_VALUES[state])

    def _request(self, chunk: list[str], tokens: int, deadline: float) -> np.ndarray:
        """One batch, retried per the policy; raises an `EmbeddingError` when it gives up."""
        attempt = 0
        while True:
            if not self.breaker.allow():
                self._count("embed_requests_total", outcome="open")
                raise EmbeddingCircuitOpenError(
                    f"embedding service {self.safe_url} is failing; not calling it for another "
                    f"{self.breaker.seconds_until_probe():.1f} s (rows stay pending)")
            started = time.monotonic()
            try:
                vectors = self._post(chunk)
            except EmbeddingError as exc:
                self.breaker.record(ok=False)
                self._observe(started)
                decision = self.retry.decide(exc, attempt)
                reason = _reason(exc)
                if (decision.action != "retry" or self.breaker.state == "open"
                        or time.monotonic() + decision.delay > deadline):
                    outcome = "rejected" if isinstance(exc, EmbeddingRejectedError) else "failed"
                    self._count("embed_requests_total", outcome=outcome)
                    raise
                self._count("embed_requests_total", outcome="retry")
                self._count("embed_retries_total", reason=reason)
                log.info("embedding request to %s failed (%s); retry %d in %.2f s",
                            self.safe_url, exc, attempt + 1, decision.delay)
                self._sleep(decision.delay)
                attempt += 1
                continue
            self.breaker.record(ok=True)
            self._observe(started)
            self._count("embed_requests_total", outcome="ok")
            self._count("embed_texts_total", len(chunk))
            self._count("embed_tokens_total", tokens)
            return vectors

    def _observe(self, started: float) -> None:
        if self.metrics is not None:
            self.metrics.embed_request_seconds.labels(space=self.space).observe(
                time.monotonic() - started)

    def _post(self, chunk: list[str]) -> np.ndarray:
        httpx = self._httpx
        body: dict[str, Any] = {"model": self.model, "input": chunk}
        if self.dimensions is not None:
            body["dimensions"] = self.dimensions
        try:
            response = self._client.post(self.url, json=body)
        except httpx.TimeoutException as exc:
            raise EmbeddingTransientError(
                f"embedding request to {self.safe_url} timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise EmbeddingTransientError(
                f"embedding request to {self.safe_url} failed: {type(exc).__name__}: {exc}") from None
        status = response.status_code
        if status == 429 or status == 408 or status >= 500:
            raise EmbeddingTransientError(
                f"embedding service {self.safe_url} answered {status}", status=status,
                retry_after=_retry_after(response.headers.get("Retry-After")))
        if status >= 400:
            hint = " (check the API key)" if status in (401, 403) else ""
            raise EmbeddingRejectedError(
                f"embedding service {self.safe_url} refused the request with {status}{hint}: "
                f"{response.text[:300]}", status=status)
        try:
            data = sorted(response.json()["data"], key=lambda d: d["index"])
            vectors = np.asarray([d["embedding"] for d in data], dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - any unusable answer is the same error
            raise EmbeddingRejectedError(
                f"embedding service {self.safe_url} answered something that is not an "
                f"embeddings response ({type(exc).__name__}: {exc})") from None
        if vectors.shape != (len(chunk), self.dim) or not np.all(np.isfinite(vectors)):
            raise EmbeddingRejectedError(
                f"{self.safe_url} returned vectors of shape {vectors.shape}, expected "
                f"({len(chunk)}, {self.dim}); check the model and `dimensions` for this space")
        return vectors


def _reason(exc: EmbeddingError) -> str:
    status = getattr(exc, "status", None)
    if status == 429:
        return "429"
    if status is not None:
        return "5xx" if status >= 500 else str(status)
    return "timeout" if "timed out" in str(exc) else "connection"


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def build_embedders(configs: Mapping[str, EmbedderConfig], *, metrics: Any = None
                    ) -> dict[str, Embedder]:
    out: dict[str, Embedder] = {}
    for space, cfg in configs.items():
        if cfg.kind == "hashing":
            out[space] = HashingEmbedder(cfg.dim)
            continue
        out[space] = HttpEmbedder(
            cfg.url or "", cfg.model or "", cfg.dim, api_key=cfg.resolve_api_key(),
            batch_size=cfg.batch_size, timeout=cfg.timeout, concurrency=cfg.concurrency,
            max_batch_tokens=cfg.max_batch_tokens, max_input_tokens=cfg.max_input_tokens,
            dimensions=cfg.dimensions,
            retry=RetryPolicy(initial_delay=cfg.retry_initial_delay, max_delay=cfg.retry_max_delay,
                              max_attempts=cfg.max_retries),
            retry_budget_seconds=cfg.retry_budget_seconds,
            breaker=CircuitBreaker(failure_threshold=cfg.breaker_failures,
                                   reset_seconds=cfg.breaker_reset_seconds),
            space=space, metrics=metrics)
    return out
