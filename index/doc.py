"""The index's value types: `IndexDoc` (what is written) and `SearchResult` (what comes back).

Validation lives here, so every backend sees only well-formed documents: a bad
document raises `ValidationError` before anything is written.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .errors import InvalidIdentifierError, ValidationError

NODE_KINDS = ("leaf", "summary", "cluster", "chunk")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
MAX_KEY_LENGTH = 512

# A document's identity in the index, and the tie-breaker of every ranking.
DocKey = tuple[str, str, str]


def check_identifier(name: object, what: str) -> str:
    """Return `name` if it is a plain identifier (letters, digits, underscore; ≤ 63 chars)."""
    if not isinstance(name, str) or not IDENTIFIER.match(name):
        raise InvalidIdentifierError(
            f"{what} {name!r} is not a plain identifier: use letters, digits and underscores, "
            "starting with a letter or underscore, at most 63 characters"
        )
    return name


def _check_key_part(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > MAX_KEY_LENGTH or "\x00" in value:
        raise ValidationError(f"{what} must be at most {MAX_KEY_LENGTH} characters with no NUL byte")
    return value


def _check_json_object(value: object, what: str, *, identifier_keys: bool) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValidationError(f"{what} must be a mapping, got {type(value).__name__}")
    out = dict(value)
    for key in out:
        if identifier_keys:
            check_identifier(key, f"{what} key")
        elif not isinstance(key, str):
            raise ValidationError(f"{what} keys must be strings, got {key!r}")
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{what} must be JSON-serialisable: {exc}") from None
    return out


def check_filter_value(key: str, value: object) -> object:
    """An attrs filter value must be a JSON scalar, so both backends compare it the same way."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise ValidationError(
        f"attrs filter {key!r} must be a string, number, boolean or None, got {type(value).__name__}"
    )


@dataclass(frozen=True, slots=True)
class IndexDoc:
    """One searchable row: an object (or one of its summary/cluster/chunk nodes) in a partition.

    `keywords` are indexed lexically (with the title) but never embedded; `payload` is
    returned with results and carried into shards; `attrs` are filtered by containment;
    `embed_spaces` names the embedding spaces this row takes part in (None: all).
    """

    object_type: str
    object_id: str
    node_kind: str = "leaf"
    title: str = ""
    body: str = ""
    keywords: Sequence[str] = ()
    partition: str = "default"
    payload: Mapping[str, Any] = field(default_factory=dict)
    attrs: Mapping[str, Any] = field(default_factory=dict)
    embed_spaces: Sequence[str] | None = None
    source_updated_at: datetime | None = None

    def __post_init__(self) -> None:
        _check_key_part(self.object_type, "object_type")
        _check_key_part(self.object_id, "object_id")
        _check_key_part(self.partition, "partition")
        if self.node_kind not in NODE_KINDS:
            raise ValidationError(f"node_kind must be one of {NODE_KINDS}, got {self.node_kind!r}")
        for name in ("title", "body"):
            value = getattr(self, name)
            if not isinstance(value, str) or "\x00" in value:
                raise ValidationError(f"{name} must be a string with no NUL byte")
        if isinstance(self.keywords, str) or not all(
            isinstance(k, str) and "\x00" not in k for k in self.keywords
        ):
            raise ValidationError("keywords must be a sequence of strings")
        object.__setattr__(self, "keywords", tuple(self.keywords))
        object.__setattr__(
            self, "payload", _check_json_object(self.payload, "payload", identifier_keys=False)
        )
        object.__setattr__(self, "attrs", _check_json_object(self.attrs, "attrs", identifier_keys=True))
        if self.embed_spaces is not None:
            if isinstance(self.embed_spaces, str):
                raise ValidationError("embed_spaces must be a sequence of space names, not a string")
            spaces = tuple(check_identifier(s, "embedding space") for s in self.embed_spaces)
            object.__setattr__(self, "embed_spaces", spaces)
        if self.source_updated_at is not None and not isinstance(self.source_updated_at, datetime):
            raise ValidationError("source_updated_at must be a datetime or None")

    @property
    def key(self) -> DocKey:
        return (self.object_type, self.object_id, self.node_kind)

    def embed_text(self) -> str:
        """The text a space embeds: title and body (keywords are lexical only)."""
        return f"{self.title}\n{self.body}" if self.title and self.body else self.title or self.body


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One ranked hit. `score` is the fused RRF score; per-channel ranks are 1-based or None."""

    object_type: str
    object_id: str
    node_kind: str
    partition: str
    title: str
    payload: Mapping[str, Any]
    attrs: Mapping[str, Any]
    score: float
    match_type: str  # 'lexical' | 'semantic' | 'hybrid'
    lexical_rank: int | None
    semantic_rank: int | None
    lexical_score: float | None
    semantic_score: float | None
    matched_node_kinds: tuple[str, ...]

    @property
    def key(self) -> DocKey:
        return (self.object_type, self.object_id, self.node_kind)


class SearchResults(list[SearchResult]):
    """The ranked hits, plus how they were found.

    `approximate` is True when the semantic channel used the HNSW index (the scope was
    larger than the backend's exact-scan limit); `scope_size` is the number of live
    rows in the query's partitions.
    """

    def __init__(self, items: Iterable[SearchResult] = (), *, approximate: bool = False,
                 scope_size: int = 0) -> None:
        super().__init__(items)
        self.approximate = approximate
        self.scope_size = scope_size
