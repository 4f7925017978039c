"""What a page of changes holds: current rows and tombstones. Pure data (no database
driver), so a device applying pages needs only the standard library and NumPy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from slipstream.index.doc import DocKey


@dataclass(frozen=True, slots=True)
class ShardRow:
    """A row's current content, as a shard stores it. `vectors` maps each requested space
    the row has a vector in to ``dim`` little-endian float32s; `pending` lists requested
    spaces whose vector the server has not computed yet."""

    key: DocKey
    partition: str
    title: str
    body: str
    keywords: tuple[str, ...]
    payload: Mapping[str, Any]
    attrs: Mapping[str, Any]
    source_updated_at: datetime | None
    tf: Mapping[str, tuple[int, int]]
    len_title: int
    len_body: int
    vectors: Mapping[str, bytes] = field(default_factory=dict)
    pending: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Tombstone:
    """`key` is no longer in `partition` (deleted, or moved to another partition)."""

    key: DocKey
    partition: str


Entry = ShardRow | Tombstone


@dataclass(frozen=True, slots=True)
class Page:
    """Entries in seq order; `next_cursor` is the cursor to ask from next; `since` is the
    cursor this page was read from (None when unknown)."""

    entries: tuple[Entry, ...]
    next_cursor: int
    has_more: bool
    since: int | None = None
