"""Synthetic corpora for the benchmarks: Zipf-distributed pseudo-English, reproducible by seed."""

from __future__ import annotations

import numpy as np
from slipstream.index import IndexDoc

_SYLLABLES = ["ka", "ri", "to", "me", "sa", "lu", "no", "ve", "pa", "di", "ro", "ne", "ta", "mi", "so", "fe", "la", "gu", "be", "zo", "an", "el", "or", "un", "is", "at", "ex", "im", "pro", "con"]


def vocabulary(size: int = 5000, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    words: set[str] = set()
    while len(words) < size:
        n = int(rng.integers(2, 5))
        words.add("".join(rng.choice(_SYLLABLES, n)))
    return sorted(words)


class Corpus:
    """Documents and queries drawn from one Zipf(1.1) vocabulary."""

    def __init__(self, seed: int = 1, vocab_size: int = 5000) -> None:
        self.vocab = vocabulary(vocab_size, seed)
        self.rng = np.random.default_rng(seed)
        ranks = np.arange(1, vocab_size + 1)
        weights = 1.0 / ranks**1.1
        self.p = weights / weights.sum()

    def words(self, n: int) -> str:
        return " ".join(self.rng.choice(self.vocab, size=n, p=self.p))

    def docs(self, n: int, partitions: list[str], start: int = 0) -> list[IndexDoc]:
        out = []
        for i in range(start, start + n):
            out.append(IndexDoc(
                object_type="note", object_id=str(i),
                title=self.words(int(self.rng.integers(3, 9))),
                body=self.words(int(self.rng.integers(30, 81))),
                partition=partitions[i % len(partitions)],
                attrs={"bucket": int(i % 7)},
                payload={"n": i},
            ))
        return out

    def queries(self, n: int) -> list[str]:
        return [self.words(int(self.rng.integers(1, 4))) for _ in range(n)]
