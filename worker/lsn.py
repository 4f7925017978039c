"""Log sequence numbers: Postgres's text form ('16/B374D848') to int and back.

An LSN is an unsigned 64-bit WAL position. The server prints it as two hex halves
separated by '/'; the wire protocol sends it as a big-endian Int64. slipstream keeps
LSNs as plain ints everywhere and converts only at the edges, with these two functions.
"""

from __future__ import annotations

import re

from slipstream.index.errors import ValidationError

MAX_LSN = 2**64 - 1

_LSN_RE = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> 0x16_B374D848; raises ValidationError for anything else."""
    m = _LSN_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValidationError(f"not an LSN: {text!r} (expected two hex numbers like '16/B374D848')")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(lsn: int) -> str:
    """0x16_B374D848 -> '16/B374D848' (upper-case hex, as Postgres prints it)."""
    if isinstance(lsn, bool) or not isinstance(lsn, int) or not 0 <= lsn <= MAX_LSN:
        raise ValidationError(f"not an LSN: {lsn!r} (expected an int in [0, 2**64))")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
