"""Which columns each relation has, and rows as dicts: the `RelationCache`.

pgoutput sends a Relation message before the first change to a table in a
session, and again whenever the table's shape changed (a column added, dropped,
renamed or retyped). The cache keeps the latest message per relation OID and uses
it to turn an Insert, Update or Delete's `TupleData` into `{column: value}`, with
each text value decoded by `pgtypes.decode_text`. Values the server left out
stay visible: `UNCHANGED` for an unchanged TOASTed column, `None` for SQL NULL;
binary-format values stay `bytes`.
"""

from __future__ import annotations

from .pgoutput import (
    NULL,
    UNCHANGED,
    DecodeError,
    Delete,
    Insert,
    Marker,
    Relation,
    TupleData,
    Update,
)
from .pgtypes import decode_text

__all__ = ["RawRow", "RelationCache", "TupleShapeError", "UnknownRelationError", "raw_row"]

Row = dict[str, object]
RawRow = dict[str, "str | None | Marker"]


class UnknownRelationError(DecodeError):
    """A change names a relation OID for which no Relation message has been seen."""

    def __init__(self, oid: int) -> None:
        self.oid = oid
        super().__init__(
            f"no Relation message seen for relation OID {oid}; the stream must be read "
            "from the start of a session, where pgoutput sends each relation before its changes"
        )


class TupleShapeError(DecodeError):
    """A tuple's column count differs from its relation's."""


def raw_row(relation: Relation, data: TupleData) -> RawRow:
    """`data` as {column: text}, before any decoding: the one place a tuple meets its relation.

    None for SQL NULL, `UNCHANGED` for an unchanged TOASTed value, binary values as
    text (the worker asks for text format). A tuple whose column count differs from
    the relation's raises `TupleShapeError`.
    """
    if len(data) != len(relation.columns):
        raise TupleShapeError(
            f"tuple for {relation.namespace}.{relation.name} has {len(data)} columns, "
            f"its Relation message has {len(relation.columns)}"
        )
    out: RawRow = {}
    for column, value in zip(relation.columns, data, strict=True):
        if value is NULL:
            out[column.name] = None
        elif isinstance(value, Marker):
            out[column.name] = UNCHANGED
        elif isinstance(value, bytes):
            out[column.name] = value.decode("utf-8", "replace")
        else:
            out[column.name] = value
    return out


class RelationCache:
    """The latest Relation message per OID, and the decoding of rows through it."""

    def __init__(self) -> None:
        self._relations: dict[int, Relation] = {}

    def add(self, relation: Relation) -> None:
        """Remember `relation`, replacing any earlier message for the same OID."""
        self._relations[relation.oid] = relation

    def __contains__(self, oid: object) -> bool:
        return oid in self._relations

    def __len__(self) -> int:
        return len(self._relations)

    def get(self, oid: int) -> Relation:
        """The relation for `oid`, or `UnknownRelationError`."""
        try:
            return self._relations[oid]
        except KeyError:
            raise UnknownRelationError(oid) from None

    def key_columns(self, oid: int) -> tuple[str, ...]:
        """Names of the replica identity columns, in table order."""
        return tuple(c.name for c in self.get(oid).columns if c.is_key)

    def row(self, oid: int, data: TupleData, *, keys_only: bool = False) -> Row:
        """`data` as {column name: value}; only the key columns when `keys_only`.

        Binary-format values stay `bytes`; text values are decoded by column type.
        """
        relation = self.get(oid)
        text = raw_row(relation, data)  # checks the shape
        row: Row = {}
        for column, value in zip(relation.columns, data, strict=True):
            if keys_only and not column.is_key:
                continue
            raw = text[column.name]
            row[column.name] = value if isinstance(value, bytes) else (
                decode_text(column.type_oid, raw) if isinstance(raw, str) else raw)
        return row

    def new_row(self, change: Insert | Update) -> Row:
        """The row after an Insert or Update."""
        return self.row(change.relation_oid, change.new)

    def old_row(self, change: Update | Delete) -> Row | None:
        """The row before an Update or Delete, as far as the server sent it.

        With the default replica identity the server sends only the key ('K'): the
        dict then has only the key columns. With REPLICA IDENTITY FULL ('O') it has
        every column. An Update that did not change the key sends nothing: None.
        """
        if change.old is None:
            return None
        return self.row(change.relation_oid, change.old, keys_only=change.old_kind == "K")

    def key(self, change: Insert | Update | Delete) -> Row:
        """The replica identity values of the row a change is about (the new one for Update)."""
        if isinstance(change, Delete):
            return self.row(change.relation_oid, change.old, keys_only=True)
        return self.row(change.relation_oid, change.new, keys_only=True)
