"""HttpEmbedder against a local OpenAI-compatible endpoint: batching, order, failures."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from slipstream.worker.embedders import EmbeddingError, HttpEmbedder

DIM = 4


class _Handler(BaseHTTPRequestHandler):
    calls: list[dict] = []
    fail = False

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append({"auth": self.headers.get("Authorization"), **body})
        if type(self).fail:
            self.send_response(503)
            self.end_headers()
            return
        data = [{"index": i, "embedding": [float(len(t)), float(i), 0.0, 1.0]}
                for i, t in enumerate(body["input"])]
        data.reverse()  # servers may answer out of order; `index` says where each goes
        payload = json.dumps({"data": data}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    _Handler.calls, _Handler.fail = [], False
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_batches_keep_order_and_send_the_key(server: str) -> None:
    embedder = HttpEmbedder(server, "m", DIM, api_key="sk-test", batch_size=2)
    out = embedder.embed(["a", "bbb", "cc"])
    assert out.dtype == np.float32 and out.shape == (3, DIM)
    assert out[:, 0].tolist() == [1.0, 3.0, 2.0]  # by input position, not answer order
    assert [len(c["input"]) for c in _Handler.calls] == [2, 1]
    assert {c["auth"] for c in _Handler.calls} == {"Bearer sk-test"}
    assert {c["model"] for c in _Handler.calls} == {"m"}


def test_outage_and_wrong_dimension_are_embedding_errors(server: str) -> None:
    _Handler.fail = True
    with pytest.raises(EmbeddingError, match="503"):
        HttpEmbedder(server, "m", DIM).embed(["x"])
    _Handler.fail = False
    with pytest.raises(EmbeddingError, match="shape"):
        HttpEmbedder(server, "m", DIM + 1).embed(["x"])
