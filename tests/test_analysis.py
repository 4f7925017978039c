"""Lexical analysis and the hashing embedder: the terms and vectors both backends share."""

import numpy as np
import pytest
from slipstream.index import HashingEmbedder, IndexDoc
from slipstream.index.analysis import analyze, analyze_doc, query_terms
from slipstream.index.sqlite_backend import fts_token


def test_analysis_folds_tokenises_drops_stop_words_and_stems() -> None:
    assert analyze("The Groceries, and RUNNING connections!") == ["groceri", "run", "connect"]
    assert analyze("ﬁle Straße") == ["file", "strass"]  # NFKC ligature, casefold ß -> ss
    assert analyze("snake_case x-ray 3.14") == ["snake", "case", "x", "ray", "3", "14"]
    assert analyze("a" * 65 + " ok") == ["ok"]
    assert analyze("") == []


def test_query_terms_are_distinct_and_sorted() -> None:
    assert query_terms("zebra apple zebras Apple") == ["appl", "zebra"]


def test_doc_fields_keep_title_and_body_apart() -> None:
    fields = analyze_doc(IndexDoc("n", "1", title="Apple pie", body="apple", keywords=["Dessert"]))
    assert fields.tf == {"appl": (1, 1), "dessert": (1, 0), "pie": (1, 0)}
    assert (fields.len_title, fields.len_body) == (3, 1)


def test_fts_tokens_survive_any_tokenizer() -> None:
    assert fts_token("apple") == "apple"
    assert fts_token("café") == "x" + "café".encode().hex()


def test_hashing_embedder_is_deterministic_and_normalised() -> None:
    e = HashingEmbedder(128)
    a, b, empty = e.embed(["quantum entanglement notes", "quantum entanglement notes", "the of"])
    assert a.dtype == np.float32 and a.shape == (128,)
    assert np.array_equal(a, b)
    assert abs(float(np.linalg.norm(a)) - 1.0) < 1e-6
    assert not empty.any()
    near, far = e.embed(["quantum entanglement", "grocery shopping list"])
    assert float(a @ near) > float(a @ far)


def test_c_and_pure_python_snowball_stem_alike() -> None:
    """The worker stems with PyStemmer (Snowball's C code) and a device may stem with the
    pure-Python `snowballstemmer`: a word they stem apart would match on one side only."""
    import glob
    import re
    import sysconfig

    stemmer_c = pytest.importorskip("Stemmer")
    from snowballstemmer.english_stemmer import EnglishStemmer

    words: set[str] = set()
    for path in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[:150]:
        with open(path, encoding="utf-8", errors="ignore") as f:
            words.update(w.casefold() for w in re.findall(r"[^\W_]+", f.read()) if not w.isdigit())
    suffixes = ["", "s", "es", "ed", "ing", "ly", "ness", "ational", "ization", "fulness", "ible", "ement"]
    words |= {w + s for w in list(words)[:3000] for s in suffixes}
    assert len(words) > 20_000
    c, pure = stemmer_c.Stemmer("english"), EnglishStemmer()
    differ = [(w, c.stemWord(w), pure.stemWord(w)) for w in sorted(words) if c.stemWord(w) != pure.stemWord(w)]
    assert differ == []
