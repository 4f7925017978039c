"""Lexical analysis: text → terms, run once in Python on the write path and for queries.

Both backends index exactly the terms this module produces, so the server and a
device shard see the same vocabulary. The pipeline (analyser ``en-1``, recorded in
every shard):

1. Unicode NFKC normalisation, then `str.casefold()`.
2. Tokens are maximal runs of letters and digits (Unicode categories L* and N*);
   everything else separates tokens. Tokens longer than 64 characters are dropped.
3. English stop words (the classic 33-word Lucene list) are removed.
4. Snowball English stemming (`snowballstemmer`, which uses PyStemmer's C code
   when installed; both give the same stems).

Changing any step changes what shards contain: bump `ANALYZER` when you do.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, OrderedDict
from dataclasses import dataclass
from itertools import repeat

import snowballstemmer

from .doc import IndexDoc
from .errors import DocumentTooLargeError

ANALYZER = "en-1"
MAX_TOKEN_LENGTH = 64

STOP_WORDS = frozenset(
    ["a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was", "will", "with"]
)

_TOKEN = re.compile(r"[^\W_]+")
_stemmer = snowballstemmer.stemmer("english")


# token -> its term, or "" when the token is dropped (stop word, too long). Bounded.
_terms: dict[str, str] = {}
_TERMS_MAX = 500_000


def _term(token: str) -> str:
    if len(_terms) >= _TERMS_MAX:
        _terms.clear()
    term = "" if len(token) > MAX_TOKEN_LENGTH or token in STOP_WORDS else _stemmer.stemWord(token)
    _terms[token] = term
    return term


def analyze(text: str) -> list[str]:
    """The terms of `text`, in order (duplicates kept, so callers can count them)."""
    if not text:
        return []
    if "\n" not in text:
        terms = _recent.get(text)
        if terms is None:
            global _recent_chars
            terms = _analyze(text)
            if text not in _recent:
                _recent[text] = terms
                _recent_chars += len(text)
            while len(_recent) > _RECENT_MAX or _recent_chars > _RECENT_CHARS:
                try:
                    _recent_chars -= len(_recent.popitem(last=False)[0])  # the oldest goes
                except KeyError:  # emptied by another thread: the count starts again
                    _recent_chars = 0
                    break
        return list(terms)
    # Line by line: the write path analyses a row's title and body, and then embeds
    # "title\nbody", so the second pass finds both in `_recent`. The same terms either
    # way: a line feed separates tokens, never composes or reorders under NFKC (a
    # starter that combines with nothing) and casefolds to itself.
    out: list[str] = []
    for line in text.split("\n"):
        if line:
            out += analyze(line)
    return out


# text -> its terms, for the texts analysed last (oldest out first): each text is
# analysed twice on the write path, for its embedding and then for its fields, a whole
# batch of embeddings first (a batch of 2,000 rows holds 4,000 titles and bodies).
# An OrderedDict: evicting a plain dict's oldest key (`next(iter(d))`) scans past every
# slot deleted before it, which made a full cache cost O(size) per new text.
# Bounded in texts and in characters too: a table of long texts (a megabyte each, and
# their terms about as much again) would otherwise hold gigabytes here.
_recent: OrderedDict[str, list[str]] = OrderedDict()
_RECENT_MAX = 8192
_RECENT_CHARS = 16 * 1024 * 1024
_recent_chars = 0


def _analyze(text: str) -> list[str]:
    tokens = _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())
    terms = list(map(_terms.get, tokens))  # C-level lookups: no Python frame per token
    if None in terms:  # tokens not met before
        terms = [_term(token) if term is None else term for token, term in zip(tokens, terms)]
    return list(filter(None, terms))  # "" marks a dropped token


def query_terms(text: str) -> list[str]:
    """The distinct terms of a query, sorted (the order every score sums in)."""
    return sorted(set(analyze(text)))


@dataclass(frozen=True, slots=True)
class LexicalFields:
    """A document's analysed fields: per-term (title, body) frequencies and field lengths.

    The title field holds the title and the keywords; the body field holds the body.
    """

    tf: dict[str, tuple[int, int]]
    len_title: int
    len_body: int

    @property
    def terms(self) -> list[str]:
        return sorted(self.tf)


def analyze_doc(doc: IndexDoc) -> LexicalFields:
    title_terms = analyze(doc.title)
    for keyword in doc.keywords:
        title_terms.extend(analyze(keyword))
    body_terms = analyze(doc.body)
    title_tf, body_tf = Counter(title_terms), Counter(body_terms)
    terms = sorted(title_tf.keys() | body_tf.keys())
    # (title, body) counts per term, built by C-level iteration (no Python frame per term).
    counts = zip(map(title_tf.get, terms, repeat(0)), map(body_tf.get, terms, repeat(0)))
    return LexicalFields(tf=dict(zip(terms, counts)), len_title=len(title_terms),
                         len_body=len(body_terms))


# The server keeps a row's distinct terms in a tsvector, whose lexemes may take at most
# 1 MiB - 1 bytes in all; a document beyond that cannot be written. NFKC expands a
# character into at most 18, case folding into at most 3, each at most 4 bytes of UTF-8,
# so a document of up to `_SAFE_CHARS` characters can never reach it.
MAX_TERM_BYTES = (1 << 20) - 1
_SAFE_CHARS = MAX_TERM_BYTES // (18 * 3 * 4)


def check_term_bytes(doc: IndexDoc) -> None:
    """Raise `DocumentTooLargeError` when `doc`'s distinct terms exceed `MAX_TERM_BYTES`.

    Costs nothing for a document under about 4,800 characters; a longer one is analysed
    (its texts then come from the analysis cache when the document is written)."""
    if len(doc.title) + len(doc.body) + sum(map(len, doc.keywords)) <= _SAFE_CHARS:
        return
    tf = analyze_doc(doc).tf
    size = sum(map(len, map(str.encode, tf)))
    if size > MAX_TERM_BYTES:
        raise DocumentTooLargeError(
            f"{doc.key}: its {len(tf):,} distinct terms take {size:,} bytes, more than a "
            f"Postgres text search vector holds ({MAX_TERM_BYTES:,}); index less of the text "
            "in one document: a shorter body, or the text split over several documents")
