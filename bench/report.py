"""How the benchmarks print their results: a title line, then one Markdown table."""

from __future__ import annotations

from collections.abc import Sequence


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """`title`, then `rows` under `header`; the first column is padded to its widest cell."""
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}\n")
    print(f"| {header[0].ljust(width)} | " + " | ".join(header[1:]) + " |")
    print(f"|{'-' * (width + 2)}|" + "---|" * (len(header) - 1))
    for row in rows:
        print(f"| {row[0].ljust(width)} | " + " | ".join(row[1:]) + " |")
