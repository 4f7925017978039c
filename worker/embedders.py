"""Server-side embedders: an OpenAI-compatible HTTP client, and building embedders from config.

`HttpEmbedder` posts batches to a ``/embeddings`` endpoint (OpenAI and the many
servers that copy its API). It raises on any failure; the index then keeps the rows
lexical-only and pending, and the worker fills them in later.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from slipstream.index import Embedder, HashingEmbedder
from slipstream.index.errors import SlipstreamError

from .config import EmbedderConfig


class EmbeddingError(SlipstreamError):
    """The embedding service failed or answered something unusable."""


class HttpEmbedder:
    """POST {url}/embeddings with {"model", "input": [...]}, in batches of `batch_size`."""

    def __init__(self, url: str, model: str, dim: int, *, api_key: str | None = None,
                 batch_size: int = 64, timeout: float = 30.0) -> None:
        import httpx

        self.url = url.rstrip("/") + "/embeddings"
        self.model, self.dim, self.batch_size = model, dim, batch_size
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            try:
                response = self._client.post(self.url, json={"model": self.model, "input": chunk})
                response.raise_for_status()
                data = sorted(response.json()["data"], key=lambda d: d["index"])
                vectors = np.asarray([d["embedding"] for d in data], dtype=np.float32)
            except Exception as exc:
                raise EmbeddingError(f"embedding request to {self.url} failed: {exc}") from exc
            if vectors.shape != (len(chunk), self.dim):
                raise EmbeddingError(
                    f"{self.url} returned vectors of shape {vectors.shape}, expected "
                    f"({len(chunk)}, {self.dim})")
            out[start:start + len(chunk)] = vectors
        return out

    def close(self) -> None:
        self._client.close()


def build_embedders(configs: Mapping[str, EmbedderConfig]) -> dict[str, Embedder]:
    out: dict[str, Embedder] = {}
    for space, cfg in configs.items():
        if cfg.kind == "hashing":
            out[space] = HashingEmbedder(cfg.dim)
        else:
            out[space] = HttpEmbedder(cfg.url or "", cfg.model or "", cfg.dim,
                                      api_key=cfg.resolve_api_key(), batch_size=cfg.batch_size,
                                      timeout=cfg.timeout)
    return out
