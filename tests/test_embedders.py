"""HttpEmbedder against a local OpenAI-compatible endpoint: batching, retries, breaker, secrets."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
from slipstream.worker.breaker import TRANSITIONS, CircuitBreaker
from slipstream.worker.embedders import (
    EmbeddingError,
    HttpEmbedder,
    PartialEmbeddingError,
    estimate_tokens,
    plan_batches,
)
from slipstream.worker.errors import (
    EmbeddingCircuitOpenError,
    EmbeddingRejectedError,
    EmbeddingTransientError,
    RetryPolicy,
)
from slipstream.worker.observe import Metrics

from .fake_openai import FakeEmbeddings, model_vectors

DIM = 8
KEY = "sk-secret-0123456789abcdef"


@pytest.fixture
def fake():
    with FakeEmbeddings({"m": DIM, "m2": DIM}) as server:
        yield server


def make(fake: FakeEmbeddings, **kw) -> HttpEmbedder:
    kw.setdefault("retry", RetryPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=3))
    kw.setdefault("sleep", lambda s: None)
    return HttpEmbedder(fake.url, kw.pop("model", "m"), kw.pop("dim", DIM), **kw)


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"slipstream_{name}", labels) or 0.0


def test_batches_keep_order_and_send_the_key(fake: FakeEmbeddings) -> None:
    embedder = make(fake, api_key=KEY, batch_size=2)
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    out = embedder.embed(texts)
    assert out.dtype == np.float32 and out.shape == (3, DIM)
    assert np.allclose(out, model_vectors("m", DIM, texts))  # by input position, not answer order
    assert [len(r["input"]) for r in fake.requests] == [2, 1]
    assert {r["auth"] for r in fake.requests} == {f"Bearer {KEY}"}
    assert all("dimensions" not in r for r in fake.requests)


def test_batches_are_bounded_by_an_estimated_token_budget() -> None:
    assert plan_batches([5, 5, 5, 5], max_items=3, max_tokens=100) == [(0, 3), (3, 4)]
    assert plan_batches([60, 50, 10, 200, 1], max_items=10, max_tokens=100) == [
        (0, 1), (1, 3), (3, 4), (4, 5)]  # a text over the budget goes alone
    assert plan_batches([], 3, 10) == []


def test_token_budget_and_truncation_against_the_service(fake: FakeEmbeddings) -> None:
    metrics = Metrics()
    embedder = make(fake, batch_size=100, max_batch_tokens=40, max_input_tokens=30,
                    metrics=metrics, space="s")
    long_text = "word " * 100  # about 167 estimated tokens: cut to 30
    texts = ["a" * 60, "b" * 60, long_text, "c" * 30]
    embedder.embed(texts)
    sent = [r["input"] for r in fake.requests]
    assert all(sum(estimate_tokens(t) for t in batch) <= 40 for batch in sent)
    assert [t for batch in sent for t in batch][:2] == texts[:2]
    cut = [t for batch in sent for t in batch][2]
    assert long_text.startswith(cut) and estimate_tokens(cut) <= 30
    assert counter(metrics, "embed_truncations_total", space="s") == 1
    assert counter(metrics, "embed_texts_total", space="s") == 4


def test_requests_run_concurrently_up_to_the_limit(fake: FakeEmbeddings) -> None:
    fake.latency = 0.1
    embedder = make(fake, batch_size=1, concurrency=4)
    texts = [f"text {i}" for i in range(8)]
    out = embedder.embed(texts)
    assert np.allclose(out, model_vectors("m", DIM, texts))
    assert 2 <= fake.max_in_flight <= 4
    embedder.close()


def test_dimensions_parameter_is_sent_when_configured(fake: FakeEmbeddings) -> None:
    out = make(fake, dimensions=DIM).embed(["x y"])
    assert fake.requests[0]["dimensions"] == DIM and out.shape == (1, DIM)


def test_429_is_retried_after_the_retry_after_it_asks_for(fake: FakeEmbeddings) -> None:
    slept: list[float] = []
    metrics = Metrics()
    fake.script = ["429:2", "503", "ok"]
    out = make(fake, sleep=slept.append, metrics=metrics, space="s").embed(["hello world"])
    assert np.allclose(out, model_vectors("m", DIM, ["hello world"]))
    assert len(fake.requests) == 3
    assert slept[0] >= 2.0 and slept[1] < 2.0  # honoured, then plain jittered backoff
    assert counter(metrics, "embed_retries_total", space="s", reason="429") == 1
    assert counter(metrics, "embed_retries_total", space="s", reason="5xx") == 1


def test_a_hung_service_times_out_and_is_retried(fake: FakeEmbeddings) -> None:
    fake.script = ["hang"]
    out = make(fake, timeout=0.3).embed(["slow one"])
    assert len(fake.requests) == 2 and np.allclose(out, model_vectors("m", DIM, ["slow one"]))


def test_outage_gives_up_after_the_policy_and_wrong_shape_is_not_retried(fake) -> None:
    fake.mode = "503"
    with pytest.raises(EmbeddingTransientError, match="503"):
        make(fake).embed(["x"])
    assert len(fake.requests) == 4  # one try and max_attempts=3 retries
    fake.reset()
    fake.script = ["wrong_shape"]
    with pytest.raises(EmbeddingRejectedError, match="shape"):
        make(fake).embed(["x"])
    assert len(fake.requests) == 1


def test_retry_budget_bounds_the_wait(fake: FakeEmbeddings) -> None:
    fake.script = ["429:30"]
    with pytest.raises(EmbeddingTransientError):  # a 30 s Retry-After is over the 5 s budget
        make(fake, retry_budget_seconds=5.0, sleep=lambda s: pytest.fail("slept")).embed(["x"])


def test_a_failed_batch_keeps_the_others(fake: FakeEmbeddings) -> None:
    fake.script = ["ok", "400"]
    with pytest.raises(PartialEmbeddingError) as info:
        make(fake, batch_size=1).embed(["a b", "c d"])
    assert info.value.done.tolist() == [True, False]
    assert np.allclose(info.value.vectors[0], model_vectors("m", DIM, ["a b"])[0])


def test_circuit_opens_stops_calling_and_probes_later(fake: FakeEmbeddings) -> None:
    now = [0.0]
    metrics = Metrics()
    breaker = CircuitBreaker(failure_threshold=2, reset_seconds=5.0, clock=lambda: now[0])
    embedder = make(fake, breaker=breaker, retry=RetryPolicy(max_attempts=0), metrics=metrics,
                    space="s")
    fake.mode = "503"
    for _ in range(2):
        with pytest.raises(EmbeddingTransientError):
            embedder.embed(["x"])
    assert breaker.state == "open"
    assert counter(metrics, "embed_circuit_state", space="s") == 2
    with pytest.raises(EmbeddingCircuitOpenError):
        embedder.embed(["x"])
    assert len(fake.requests) == 2  # nothing sent while open
    now[0] += 5.0
    with pytest.raises(EmbeddingTransientError):  # the probe goes out and fails: open again
        embedder.embed(["x"])
    assert len(fake.requests) == 3 and breaker.state == "open"
    fake.mode = None
    now[0] += 5.0
    with pytest.raises(EmbeddingCircuitOpenError):  # the wait doubled after a failed probe
        embedder.embed(["x"])
    now[0] += 5.0
    embedder.embed(["x"])
    assert breaker.state == "closed" and len(fake.requests) == 4
    assert counter(metrics, "embed_circuit_state", space="s") == 0


def test_breaker_transitions_are_data() -> None:
    assert TRANSITIONS[("open", "probe")] == "half_open"
    assert TRANSITIONS[("half_open", "success")] == "closed"
    assert TRANSITIONS[("half_open", "failure")] == "open"
    now = [0.0]
    b = CircuitBreaker(failure_threshold=1, reset_seconds=1.0, clock=lambda: now[0])
    b.record(ok=False)
    now[0] = 1.0
    assert b.allow() and b.state == "half_open"
    assert not b.allow()  # only one probe at a time


def test_retry_policy_honours_retry_after_up_to_its_cap() -> None:
    policy = RetryPolicy(initial_delay=0.1, max_delay=1.0, max_retry_after=10.0)
    rng = random.Random(1)
    assert policy.decide(EmbeddingTransientError("x", retry_after=3.0), 0, rng).delay == 3.0
    assert policy.decide(EmbeddingTransientError("x", retry_after=99.0), 0, rng).delay == 10.0
    assert policy.decide(EmbeddingTransientError("x"), 0, rng).delay <= 0.1
    assert policy.decide(EmbeddingRejectedError("x"), 0, rng).action == "stop"
    assert policy.decide(EmbeddingCircuitOpenError("x"), 0, rng).action == "stop"


def test_the_api_key_is_never_logged(fake: FakeEmbeddings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    metrics = Metrics()
    breaker = CircuitBreaker(failure_threshold=3)
    embedder = make(fake, api_key=KEY, metrics=metrics, breaker=breaker, max_input_tokens=5)
    messages = []
    fake.script = ["429:0", "401"]
    fake.mode = "503"
    for _ in range(3):
        try:
            embedder.embed(["a long text that is cut to the limit"])
        except EmbeddingError as exc:
            messages.append(f"{exc!r} {exc} {exc.__cause__!r}")
    assert fake.requests and all(r["auth"] == f"Bearer {KEY}" for r in fake.requests)
    assert caplog.records, "the failures were logged"
    everything = caplog.text + " ".join(messages) + repr(embedder) + metrics.render().decode()
    assert KEY not in everything and "sk-secret" not in everything


def test_a_batch_refused_for_one_text_is_halved_until_only_that_text_fails(fake) -> None:
    texts = ["fine one", "fine two", "poison pill", "fine three", "fine four"]
    with pytest.raises(PartialEmbeddingError) as info:
        make(fake, batch_size=8).embed(texts)
    assert info.value.done.tolist() == [True, True, False, True, True]
    assert np.allclose(info.value.vectors[3], model_vectors("m", DIM, ["fine three"])[0])
    assert len(fake.requests) <= 1 + 2 * 3  # halving: at most two requests per level


def test_embedding_config_keys_reach_the_client(fake: FakeEmbeddings) -> None:
    from slipstream.worker.config import ConfigError, parse_config
    from slipstream.worker.embedders import build_embedders

    base = {"source": {"dsn": "postgresql://x/y"}, "spaces": {"server": DIM},
            "search": {"embed_cache_rows": 500},
            "embedders": {"server": {"kind": "http", "url": fake.url, "model": "m",
                                     "concurrency": 3, "max_batch_tokens": 1000,
                                     "max_input_tokens": 100, "dimensions": DIM,
                                     "max_retries": 2, "breaker_failures": 7}}}
    cfg = parse_config(base)
    assert cfg.search.embed_cache_rows == 500
    embedder = build_embedders(cfg.embedders)["server"]
    assert (embedder.concurrency, embedder.max_batch_tokens, embedder.max_input_tokens,
            embedder.dimensions, embedder.retry.max_attempts, embedder.breaker.failure_threshold
            ) == (3, 1000, 100, DIM, 2, 7)
    embedder.embed(["a b"])
    assert fake.requests[0]["dimensions"] == DIM
    base["embedders"]["server"]["dimensions"] = DIM + 1
    with pytest.raises(ConfigError, match="embedders.server.dimensions"):
        parse_config(base)


def test_content_hash_cache_is_off_by_default_only_for_local_hashing_embedders() -> None:
    """The cache saves a model call per repeated text; for a hashing embedder a lookup and a
    write on the search database cost more than recomputing, so unset means off there."""
    from slipstream.worker.config import DEFAULT_EMBED_CACHE_ROWS, parse_config

    def cfg(kinds: dict[str, str], search: dict | None = None):
        embedders = {space: ({"kind": "hashing"} if kind == "hashing" else
                             {"kind": "http", "url": "http://127.0.0.1:9/v1", "model": "m"})
                     for space, kind in kinds.items()}
        return parse_config({"source": {"dsn": "postgresql://x/y"}, "search": search or {},
                             "spaces": {s: DIM for s in kinds}, "embedders": embedders})

    assert cfg({"local": "hashing"}).embed_cache_rows() == 0
    assert cfg({"local": "hashing", "server": "http"}).embed_cache_rows() == DEFAULT_EMBED_CACHE_ROWS
    assert cfg({"server": "http"}).embed_cache_rows() == DEFAULT_EMBED_CACHE_ROWS
    assert cfg({"local": "hashing"}, {"embed_cache_rows": 50}).embed_cache_rows() == 50
    assert cfg({"server": "http"}, {"embed_cache_rows": 0}).embed_cache_rows() == 0
