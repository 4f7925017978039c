"""How decoded column values become text and JSON for an `IndexDoc`.

This module owns three small pieces that the TOML configuration checks at load
time and the TOML mapper applies to every row:

* `Template`: a `str.format`-style string whose only placeholders are `{column}`.
  Attribute access (`{a.b}`), indexing (`{a[0]}`), positional fields (`{}`, `{0}`),
  conversions (`{a!r}`) and format specs (`{a:>10}`) are refused when the template
  is parsed, so rendering never runs code chosen by the configuration. `{{` and `}}`
  are literal braces. Values are rendered by `to_text`.
* `to_text` (template values) and `json_safe` (attrs and payload values), with one
  documented conversion per Python type the decoder (`pgtypes`) produces:

  | value                  | `to_text`                      | `json_safe`                       |
  | ---------------------- | ------------------------------ | --------------------------------- |
  | None                   | ""                             | None                              |
  | str                    | as is                          | as is                             |
  | bool                   | "true" / "false"               | as is                             |
  | int                    | str(v)                         | as is                             |
  | float                  | repr-style str(v)              | as is; NaN and ±inf → None        |
  | Decimal                | str(v)                         | int(v) when integral, else float(v); NaN and ±Infinity → None |
  | datetime, date, time   | v.isoformat()                  | v.isoformat()                     |
  | UUID                   | str(v)                         | str(v)                            |
  | bytes, memoryview      | refused (`TypeError`)          | standard base64 string            |
  | list (array)           | items joined with ", " (None items skipped) | list, items converted |
  | dict (json/jsonb)      | compact JSON, sorted keys      | dict, values converted            |

  Decimal becomes a JSON *number* so that numeric attrs filter the same way on both
  backends and clients get numbers. An integral one (a `numeric(20)` id, an amount in
  cents) stays exact at any size; a fractional one loses digits beyond float precision
  (~15–17 significant). A mapper that needs exact fractions writes them itself (a
  Python mapper), e.g. as strings. JSON has no NaN or infinity, hence None.
* `split_chunks`: cut a long text into overlapping pieces at whitespace.

Nothing here raises anything but `TemplateError` (a ValueError) for a bad template,
`TypeError` for a value that has no text or JSON form, and `KeyError` for a column
a row lacks; callers turn those into `ConfigError` (at load) or `MapperError` (per row).
"""

from __future__ import annotations

import base64
import json
import math
import string
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal

__all__ = ["Template", "TemplateError", "json_safe", "split_chunks", "to_text"]

_FORMATTER = string.Formatter()


class TemplateError(ValueError):
    """A template string uses something other than plain `{column}` placeholders."""


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template: literal text and column names, alternating (`parts`)."""

    source: str
    parts: tuple[tuple[str, str | None], ...]

    @classmethod
    def parse(cls, source: str) -> Template:
        """Parse `source`, or raise `TemplateError` saying which placeholder is refused and why."""
        try:
            parsed = list(_FORMATTER.parse(source))
        except ValueError as exc:  # unbalanced braces
            raise TemplateError(f"{exc}; write {{{{ and }}}} for literal braces") from None
        parts: list[tuple[str, str | None]] = []
        for literal, field_name, format_spec, conversion in parsed:
            if field_name is None:
                parts.append((literal, None))
                continue
            shown = "{" + field_name + (f"!{conversion}" if conversion else "") + (
                f":{format_spec}" if format_spec else "") + "}"
            if field_name == "" or field_name.isdigit():
                raise TemplateError(
                    f"placeholder {shown} is positional; name a column, as in {{title}}")
            if "." in field_name or "[" in field_name:
                raise TemplateError(
                    f"placeholder {shown} uses attribute or index access; templates take "
                    "plain {column} placeholders only (write a Python mapper for more)")
            if conversion or format_spec:
                raise TemplateError(
                    f"placeholder {shown} has a conversion or format spec; templates take "
                    "plain {column} placeholders only (values are rendered as text for you)")
            if field_name != field_name.strip():
                raise TemplateError(
                    f"placeholder {shown} has spaces around the column name; "
                    f"write {{{field_name.strip()}}}")
            parts.append((literal, field_name))
        return cls(source, tuple(parts))

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns the template reads, in order of first use."""
        return tuple(dict.fromkeys(c for _, c in self.parts if c is not None))

    def render(self, row: Mapping[str, object]) -> str:
        """The text for `row`; `KeyError(column)` when the row lacks a column."""
        out: list[str] = []
        for literal, column in self.parts:
            out.append(literal)
            if column is not None:
                out.append(to_text(row[column]))
        return "".join(out)


def to_text(value: object) -> str:
    """A column value as template text (see the module docstring for the table)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return ", ".join(t for t in (to_text(v) for v in value) if t)
    if isinstance(value, dict):
        return json.dumps(json_safe(value), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError("a bytea value cannot be rendered as text; leave it out of templates")
    raise TypeError(f"a {type(value).__name__} value cannot be rendered as text")


def json_safe(value: object) -> object:
    """A column value as a JSON-serialisable value (see the module docstring for the table)."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"a JSON object key must be a string, got {k!r}")
            out[k] = json_safe(v)
        return out
    raise TypeError(f"a {type(value).__name__} value has no JSON form")


def split_chunks(text: str, size: int, overlap: int) -> list[tuple[int, str]]:
    """Cut `text` into `(start offset, piece)` pairs of at most `size` characters.

    A text of at most `size` characters is one piece. Otherwise each piece ends at
    the last whitespace character that keeps it within `size` (the whitespace is
    left out of that piece), or exactly at `size` when the piece's second half has
    no whitespace. The next piece starts `overlap` characters before the previous
    one ended, moved back to the start of a word when one begins within a tenth of
    `size` (so pieces overlap by at least `overlap`). Every character of `text` lies
    in some piece, and pieces are in order. Requires 0 <= overlap < size.
    """
    if not 0 <= overlap < size:
        raise ValueError(f"need 0 <= overlap < size, got size={size}, overlap={overlap}")
    n = len(text)
    if n <= size:
        return [(0, text)]
    chunks: list[tuple[int, str]] = []
    start = 0
    slack = max(1, size // 10)
    while True:
        limit = start + size
        if limit >= n:
            chunks.append((start, text[start:]))
            return chunks
        # Cut at whitespace, but keep the piece long enough for the next one to advance.
        earliest = start + max(overlap + 1, size // 2)
        end = limit
        for i in range(limit, earliest - 1, -1):
            if text[i].isspace():
                end = i
                break
        chunks.append((start, text[start:end]))
        nxt = end - overlap  # > start, since end >= start + overlap + 1
        if not text[nxt - 1].isspace() and not text[nxt].isspace():  # mid-word
            for i in range(nxt - 1, max(start, nxt - 1 - slack), -1):
                if text[i].isspace():
                    nxt = i + 1
                    break
        start = nxt


def column_list(values: Sequence[str]) -> str:
    """Column names for a message: 'a', 'b' and 'c'."""
    quoted = [repr(v) for v in values]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
