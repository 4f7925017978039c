"""The fast analysis and hashing paths against a straightforward reference, bit for bit.

Server and device rank alike only because both index the same terms and the same
vectors, so the write path's analysis (`analyze`, `analyze_doc`) and `HashingEmbedder`
must give exactly what the plain, loop-per-token definition gives: the same term lists,
the same (title, body) frequencies, and float32 vectors equal byte for byte.
"""

from __future__ import annotations

import unicodedata
import zlib
from collections import Counter
from itertools import chain, pairwise

import numpy as np
import pytest
import snowballstemmer
from slipstream.index import IndexDoc, analysis
from slipstream.index.analysis import MAX_TOKEN_LENGTH, STOP_WORDS, analyze, analyze_doc
from slipstream.index.embedding import HashingEmbedder

_stemmer = snowballstemmer.stemmer("english")


def reference_analyze(text: str) -> list[str]:
    out = []
    for token in analysis._TOKEN.findall(unicodedata.normalize("NFKC", text).casefold()):
        if len(token) > MAX_TOKEN_LENGTH or token in STOP_WORDS:
            continue
        out.append(_stemmer.stemWord(token))
    return out


def reference_embed(texts: list[str], dim: int) -> np.ndarray:
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        terms = reference_analyze(text)
        idx, sign = [], []
        for feature in chain(terms, map(" ".join, pairwise(terms))):
            data = feature.encode("utf-8")
            idx.append(zlib.crc32(data) % dim)
            sign.append(1.0 if zlib.crc32(data, 0x5BD1E995) & 1 else -1.0)
        if not idx:
            continue
        vec = np.bincount(idx, weights=sign, minlength=dim)
        norm = float(np.sqrt(vec @ vec))
        if norm > 0:
            out[row] = vec / norm
    return out


def texts() -> list[str]:
    rng = np.random.default_rng(11)
    words = ["running", "runs", "ran", "the", "and", "Café", "naïve", "ﬁsh", "Straße", "STRASSE",
             "日本語", "中文", "Ωmega", "x" * 64, "y" * 65, "don't", "e-mail", "user_name", "42",
             "３４５", "①", "İstanbul", "ǅemal", "ﬀ", "\u0301accent", "a\u0301", "🎉", "generalization",
             "relational", "caresses", "ponies", "in", "it", "such", "Ⅻ", "ｆｕｌｌｗｉｄｔｈ"]
    out = ["", "   ", "the and of to", "The", "one", "x" * 300, "a_b c_d__e", "tab\tsep\nlines\r\n",
           "🎉🎉 party 🎉", "Ünïcödé ÜNÏCÖDÉ ünïcödé", "\u212bngstr\u00f6m vs \u00c5ngstr\u00f6m",
           "ﬁne ﬂow ﬃ", "repeated repeated repeated words words", "1,234.56 and 7-8-9",
           "line one\n\u0301combining at a line start\nﬁ\n\n\nend", "\n\nleading", "trailing\n",
           "a\r\nb\rc", "e\n\u0301", "x\u0301\ny", "Å\n\u030a", "\n", "\n\n\n", "ǆ\nǅ\nǄ"]
    for n in (1, 2, 5, 50, 400, 3000):  # long text included
        for _ in range(3):
            out.append(" ".join(rng.choice(words, size=n)))
            out.append("\n".join(rng.choice(words + ["\n", "", " "], size=n)))  # many lines
    out += [f"{a}\n{b}" for a, b in zip(out, reversed(out))]  # the embedder's "title\nbody"
    return out


def test_analyze_gives_the_reference_terms_cold_and_warm() -> None:
    analysis._terms.clear()  # cold: every token goes through the stemmer
    cold = [analyze(t) for t in texts()]
    warm = [analyze(t) for t in texts()]  # warm: every token from the cache
    expected = [reference_analyze(t) for t in texts()]
    assert cold == expected and warm == expected


def test_analyze_answers_a_fresh_list_each_time() -> None:
    first = analyze("apples and pears")
    first.append("mutated")
    assert analyze("apples and pears") == ["appl", "pear"]
    assert analyze("apples\npears") == ["appl", "pear"]


def test_analyze_doc_counts_match_the_reference() -> None:
    ts = texts()
    for i, body in enumerate(ts):
        doc = IndexDoc("t", str(i), title=ts[-1 - i], body=body, keywords=[ts[i // 2], "Keyword ﬁ"])
        lex = analyze_doc(doc)
        title = reference_analyze(doc.title) + [t for k in doc.keywords for t in reference_analyze(k)]
        body_terms = reference_analyze(body)
        ct, cb = Counter(title), Counter(body_terms)
        assert lex.tf == {t: (ct[t], cb[t]) for t in sorted(ct.keys() | cb.keys())}
        assert list(lex.tf) == sorted(lex.tf)
        assert (lex.len_title, lex.len_body) == (len(title), len(body_terms))


@pytest.mark.parametrize("dim", [1, 7, 32, 384])
def test_hashing_embedder_is_bit_identical_to_the_reference(dim: int) -> None:
    ts = texts()
    expected = reference_embed(ts, dim)
    emb = HashingEmbedder(dim)
    for got in (emb.embed(ts), emb.embed(ts)):  # cold bucket cache, then warm
        assert got.dtype == np.float32 and got.shape == (len(ts), dim)
        assert got.tobytes() == expected.tobytes()
    one_by_one = np.vstack([emb.embed([t]) for t in ts])  # a batch changes nothing
    assert one_by_one.tobytes() == expected.tobytes()
    assert emb.embed([]).shape == (0, dim)
