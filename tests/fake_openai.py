"""A fake OpenAI-compatible ``/embeddings`` endpoint on 127.0.0.1, for tests and benchmarks.

It records every request (texts, model, headers) and answers with deterministic
vectors: `HashingEmbedder(dim)` of the text, rolled by an amount that depends on the
model, so two models give different vectors for the same text while texts keep their
similarities within a model. Faults are scripted: `script` is a list of answers used
one per request before normal service resumes ("429:<retry-after>", "503", "hang",
"wrong_shape", "ok"), `mode` applies to every request while set (e.g. "503" for
an outage), and `fault_every` = n makes every n-th request answer `fault`. A request
holding a text with the word "poison" is refused with 400, as services refuse a
batch for one bad input. `latency` adds service time to each request.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

import numpy as np
from slipstream.index import HashingEmbedder


def model_vectors(model: str, dim: int, texts: list[str]) -> np.ndarray:
    """The vectors the fake returns for `model`: what a test compares stored vectors with."""
    return np.roll(HashingEmbedder(dim).embed(texts), zlib.crc32(model.encode()) % dim, axis=1)


class FakeEmbeddings:
    def __init__(self, dims: dict[str, int] | None = None, *, latency: float = 0.0) -> None:
        self.dims = dims or {}
        self.latency = latency
        self.mode: str | None = None
        self.script: list[str] = []
        self.fault_every = 0  # when > 0, every n-th request answers `fault` instead
        self.fault = "429:0.05"
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self._release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"auth": self.headers.get("Authorization"), **body})
                    action = fake.script.pop(0) if fake.script else (fake.mode or "ok")
                    if fake.fault_every and len(fake.requests) % fake.fault_every == 0:
                        action = fake.fault
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    if fake.latency:
                        time.sleep(fake.latency)
                    self._answer(action, body)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def do_GET(self) -> None:
                with fake.lock:
                    stats = {"requests": len(fake.requests), "texts": sum(
                        len(r["input"]) for r in fake.requests), "max_in_flight": fake.max_in_flight}
                self._send(200, json.dumps(stats).encode())

            def _answer(self, action: str, body: dict) -> None:
                if action == "hang":
                    fake._release.wait(30)
                    return self._send(503, b"{}")
                if action.startswith("429"):
                    _, _, after = action.partition(":")
                    return self._send(429, b'{"error": "rate limited"}',
                                      {"Retry-After": after} if after else {})
                if action in ("503", "500", "400", "401"):
                    return self._send(int(action), b'{"error": "unavailable"}')
                if any("poison" in t for t in body["input"]):  # refuses any request holding one
                    return self._send(400, b'{"error": "input rejected"}')
                model = body["model"]
                dim = body.get("dimensions") or fake.dims.get(model, 8)
                vectors = model_vectors(model, dim, list(body["input"]))
                if action == "wrong_shape":
                    vectors = vectors[:, : max(1, dim - 1)]
                data = [{"index": i, "embedding": v.tolist(), "object": "embedding"}
                        for i, v in enumerate(vectors)]
                data.reverse()  # servers may answer out of order; `index` says where each goes
                self._send(200, json.dumps({"data": data, "model": model}).encode())

            def _send(self, status: int, payload: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def texts(self) -> list[str]:
        """Every text sent so far, in order."""
        with self.lock:
            return [t for r in self.requests for t in r["input"]]

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.script.clear()
            self.mode = None

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def main() -> None:
    """Serve in a process of its own (so its work does not share the caller's GIL):
    ``python -m tests.fake_openai MODEL DIM LATENCY_S FAULT_EVERY``; prints the URL."""
    import sys

    model, dim, latency, every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    fake = FakeEmbeddings({model: dim}, latency=latency)
    fake.fault_every = every
    with fake:
        print(fake.url, flush=True)
        sys.stdin.read()  # until the parent closes our stdin


if __name__ == "__main__":
    main()
