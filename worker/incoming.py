"""What comes in from the source: its row changes as the apply loop sees them, and batches.

("Changes" alone means the change log, `slipstream.shardsync.changelog`, which devices read.)

The stream turns pgoutput events into `SourceChange`s: the row's column values as the
server's text (so unchanged TOAST values can be merged before decoding), its
replica-identity key, and where it sits in its source transaction. A `Batch` is what
one apply transaction covers, and says which checkpoint it makes durable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .pgoutput import Relation
from .pgtypes import decode_text
from .relations import RawRow, raw_row

Columns = tuple[tuple[str, int], ...]  # (name, type oid)

__all__ = ["Batch", "Columns", "RawRow", "SourceChange", "TxnEnd", "columns_of", "decode_row",
           "key_columns", "raw_row", "relation_name", "row_key"]


@dataclass(frozen=True, slots=True)
class SourceChange:
    """One row change (or a truncate) from the source, in commit order.

    `kind` is insert, update, delete, truncate, snapshot (a row read by the initial
    copy or a backfill, applied only if nothing newer has been applied for that row),
    or vanished (a row a copy after a gap in the stream did not find: deleted, likewise
    only if nothing newer has been applied for it).
    """

    kind: str
    relation: str
    commit_lsn: int
    index: int = 0
    key: str | None = None
    values: RawRow | None = None
    columns: Columns = ()
    old_key: str | None = None
    truncated: tuple[str, ...] = ()
    commit_ts: float | None = None

    @property
    def approx_bytes(self) -> int:
        if not self.values:
            return 64
        return 64 + sum(len(v) for v in self.values.values() if isinstance(v, str))


@dataclass(frozen=True, slots=True)
class TxnEnd:
    """A source transaction fully read: its commit LSN, end LSN and commit time (epoch s)."""

    commit_lsn: int
    end_lsn: int
    commit_ts: float


@dataclass(slots=True)
class Batch:
    """Changes for one apply transaction, and the transactions they complete.

    `partial` is (commit_lsn, changes done) when the batch ends inside a transaction.
    """

    changes: list[SourceChange] = field(default_factory=list)
    completed: list[TxnEnd] = field(default_factory=list)
    partial: tuple[int, int] | None = None
    bytes: int = 0
    snapshot: bool = False  # rows from a table copy, not the stream

    def __bool__(self) -> bool:
        return bool(self.changes or self.completed)


def relation_name(rel: Relation) -> str:
    return f"{rel.namespace}.{rel.name}"


def columns_of(rel: Relation) -> Columns:
    return tuple((c.name, c.type_oid) for c in rel.columns)


def key_columns(rel: Relation) -> tuple[str, ...]:
    return tuple(c.name for c in rel.columns if c.is_key)


def row_key(values: Mapping[str, object], key_cols: Sequence[str]) -> str:
    """A stable text key for a source row: its replica identity values as a JSON list."""
    return json.dumps([values.get(c) for c in key_cols], separators=(",", ":"))


def decode_row(values: Mapping[str, str | None], columns: Columns) -> dict[str, object]:
    """Text values to Python values by column type (unknown types stay text)."""
    types = dict(columns)
    return {name: None if text is None else decode_text(types.get(name, 25), text)
            for name, text in values.items()}
