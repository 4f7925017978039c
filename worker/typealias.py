"""How a column whose type the decoder does not know by OID is decoded.

`pgtypes.decode_text` knows the built-in types by OID and leaves any other value as
its text. Two kinds of type are built on ones it knows, and are read as those:

* a domain (`CREATE DOMAIN posint AS integer CHECK …`, also a domain over a domain)
  as its base type, so a `posint` reaches a mapper as an int, not as '42';
* an array whose elements it cannot parse (`inet[]`, an enum's or a domain's array)
  as `text[]` (a list of each element's text) or, for a domain's array, as its
  base type's array; except arrays whose elements are delimited by another
  character than a comma (`box[]` uses ';'), which stay text.

`type_aliases(conn)` reads these from the source's catalog as {type OID: the OID to
decode it as}. The copy (`snapshot.table_shape`) and the stream (`TxnAssembler`)
apply the same map, so a row decodes alike on either path. A type created while
the worker runs is read as text until the next start.
"""

from __future__ import annotations

from collections.abc import Mapping

import psycopg

from .pgoutput import Column, Relation
from .pgtypes import ARRAY_ELEMENT, OID, decodes

__all__ = ["alias_relation", "type_aliases"]

_DOMAINS = """
WITH RECURSIVE dom(oid, base) AS (
    SELECT oid, typbasetype FROM pg_type WHERE typtype = 'd'
  UNION ALL
    SELECT dom.oid, t.typbasetype FROM dom JOIN pg_type t ON t.oid = dom.base WHERE t.typtype = 'd'
)
SELECT dom.oid::int, dom.base::int FROM dom JOIN pg_type t ON t.oid = dom.base WHERE t.typtype <> 'd'
"""
# True array types only: the element's own array type (not oidvector, int2vector, …).
_ARRAYS = """
SELECT a.oid::int, e.oid::int, e.typdelim::text
FROM pg_type a JOIN pg_type e ON e.oid = a.typelem AND e.typarray = a.oid
"""

_ARRAY_OF = {element: array for array, element in ARRAY_ELEMENT.items()}
_TEXT_ARRAY = _ARRAY_OF[OID["text"]]


def type_aliases(conn: psycopg.Connection) -> dict[int, int]:
    """{type OID: the OID to decode its values as} for this database's domains and arrays."""
    aliases = {oid: base for oid, base in conn.execute(_DOMAINS).fetchall()}
    for array, element, delimiter in conn.execute(_ARRAYS).fetchall():
        if array in ARRAY_ELEMENT:
            continue
        base = aliases.get(element, element)
        if base in _ARRAY_OF:
            aliases[array] = _ARRAY_OF[base]
        elif delimiter == "," and not decodes(base):
            aliases[array] = _TEXT_ARRAY
    # A domain over such an array (a domain over inet[]) is read as the array is.
    return {oid: aliases.get(base, base) for oid, base in aliases.items()}


def alias_relation(rel: Relation, aliases: Mapping[int, int]) -> Relation:
    """`rel` with each column's type OID replaced by the one to decode it as."""
    if not any(c.type_oid in aliases for c in rel.columns):
        return rel
    columns = tuple(Column(c.flags, c.name, aliases.get(c.type_oid, c.type_oid), c.type_modifier)
                    for c in rel.columns)
    return Relation(rel.oid, rel.namespace, rel.name, rel.replica_identity, columns, rel.xid)
