"""From pgoutput events to source changes, skipping what the checkpoint already covers.

`TxnAssembler` follows Relation messages, numbers each change within its source
transaction, and drops every transaction that committed before the checkpoint and the
changes of a partly applied transaction that are already durable — the read side of
the exactly-once guarantee. It sees only decoded events, never a socket.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .errors import TableRenamedError
from .incoming import SourceChange, TxnEnd, columns_of, key_columns, raw_row, relation_name, row_key
from .pgoutput import (
    Begin,
    Commit,
    DecodeError,
    Delete,
    Event,
    Insert,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Update,
)
from .relations import RelationCache
from .state import Checkpoint
from .typealias import alias_relation


class TxnAssembler:
    """Turns the event stream into `SourceChange`s and `TxnEnd`s in commit order."""

    def __init__(self, checkpoint: Checkpoint, tables: Iterable[str] | None = None,
                 oids: Mapping[str, int] | None = None,
                 type_aliases: Mapping[int, int] | None = None,
                 keys: Mapping[str, Sequence[str]] | None = None) -> None:
        self.checkpoint = checkpoint
        self.tables = set(tables) if tables is not None else None
        # Each configured table's current OID: changes under its name but another OID are
        # a dropped table's, left in the slot from before it was replaced (`reset_replaced`).
        self.oids = dict(oids or {})
        self.type_aliases = dict(type_aliases or {})  # domains and arrays (`typealias`)
        # Each configured table's key columns (`table_shape`); else the replica identity's.
        # They differ under REPLICA IDENTITY FULL, where every column is flagged as key.
        self.keys = {name: tuple(cols) for name, cols in (keys or {}).items()}
        self.relations = RelationCache()
        self.final_lsn: int | None = None  # set between Begin and Commit
        self.commit_ts = 0.0
        self.index = 0
        self.skip_all = False
        self.skip_below = 0

    @property
    def in_transaction(self) -> bool:
        return self.final_lsn is not None

    def position(self) -> tuple[int, int] | None:
        """(commit LSN, changes seen) of the open transaction, or None between transactions."""
        return None if self.final_lsn is None else (self.final_lsn, self.index)

    def feed(self, event: Event) -> list[SourceChange | TxnEnd]:
        if isinstance(event, Begin):
            self.final_lsn = event.final_lsn
            self.commit_ts = event.commit_ts.timestamp()
            self.index = 0
            cp = self.checkpoint
            self.skip_all = event.final_lsn < cp.lsn
            self.skip_below = cp.partial_offset if event.final_lsn == cp.partial_lsn else 0
            return []
        if isinstance(event, Commit):
            lsn = self.final_lsn
            self.final_lsn = None
            if self.skip_all or lsn is None:
                return []
            return [TxnEnd(event.commit_lsn, event.end_lsn, event.commit_ts.timestamp())]
        if isinstance(event, Relation):
            if event.oid in self.relations:
                self._check_name(self.relations.get(event.oid), event)
            self.relations.add(alias_relation(event, self.type_aliases))
            return []
        if isinstance(event, (Insert, Update, Delete, Truncate)):
            if self.final_lsn is None:
                raise DecodeError(f"{type(event).__name__} outside a transaction")
            change = self._change(event)
            index = self.index
            self.index += 1
            if change is None or self.skip_all or index < self.skip_below:
                return []
            return [change]
        if isinstance(event, (StreamStart, StreamStop, StreamCommit, StreamAbort)):
            raise DecodeError("streamed in-progress transactions need protocol v2; the worker reads v1")
        return []  # Origin, Type, Message: nothing to apply

    def _check_name(self, before: Relation, now: Relation) -> None:
        """Stop, rather than drop its changes unseen from here on, when a configured table
        is renamed or moved to another schema under the worker."""
        old, new = relation_name(before), relation_name(now)
        if old != new and self._wanted(old) and not self._wanted(new):
            raise TableRenamedError(
                f"table {old!r} was renamed to {new!r} in the source database (relation OID "
                f"{now.oid}); its changes now arrive under the new name, which [tables] does not "
                f'list. Rename its section to [tables."{new}"] and start the worker again (the '
                "table is then copied again under its new name)")

    def _current(self, rel: Relation) -> bool:
        """A configured table, and the one that has its name now (not a dropped one)."""
        name = relation_name(rel)
        return self._wanted(name) and self.oids.get(name, rel.oid) == rel.oid

    def _wanted(self, name: str) -> bool:
        return self.tables is None or name in self.tables

    def _change(self, event: Insert | Update | Delete | Truncate) -> SourceChange | None:
        assert self.final_lsn is not None
        common = {"commit_lsn": self.final_lsn, "index": self.index, "commit_ts": self.commit_ts}
        if isinstance(event, Truncate):
            rels = [self.relations.get(oid) for oid in event.relation_oids]
            names = tuple(relation_name(r) for r in rels if self._current(r))
            if not names:
                return None
            return SourceChange(kind="truncate", relation=names[0], truncated=names, **common)
        rel = self.relations.get(event.relation_oid)
        if not self._current(rel):
            return None
        name = relation_name(rel)
        keys = self.keys.get(name) or key_columns(rel)
        if isinstance(event, Delete):
            old = raw_row(rel, event.old) if event.old_kind == "O" else _key_row(rel, event.old)
            return SourceChange(kind="delete", relation=name, key=row_key(old, keys), **common)
        values = raw_row(rel, event.new)
        old_key = None
        if isinstance(event, Update) and event.old is not None:
            old = raw_row(rel, event.old) if event.old_kind == "O" else _key_row(rel, event.old)
            old_key = row_key(old, keys)
        kind = "insert" if isinstance(event, Insert) else "update"
        return SourceChange(kind=kind, relation=name, key=row_key(values, keys), values=values,
                            columns=columns_of(rel), old_key=old_key, **common)


def _key_row(rel: Relation, data) -> dict:
    """A 'K' old tuple: key columns carry values, the rest are NULL markers."""
    return {k: v for k, v in raw_row(rel, data).items() if isinstance(v, str) or v is None}
