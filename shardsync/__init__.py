"""slipstream.shardsync: the change log reader, shard export, delta sync, sync server and client.

The core: `ChangeLog` (the log's tables, `append`, the one-slot claim, the horizon),
`changes_since` (pages of current rows and tombstones), `export_shard` (a partition's
snapshot into a new shard file), `open_shard` / `apply_page` (a device shard that
follows the log) and `compact`. The device side (`entries`, `shard`, `errors`) needs
only the standard library and NumPy; the server side (psycopg) is imported on first
use. Never imports `slipstream.worker`.
"""

from __future__ import annotations

from typing import Any

from .entries import Page, ShardRow, Tombstone
from .errors import ResyncRequired, ShardFormatError, SlotConflictError
from .shard import apply_page, open_shard, shard_cursor, shard_partitions

_SERVER_SIDE = {
    "ChangeEntry": "changelog", "ChangeLog": "changelog", "DEFAULT_RETENTION": "compact",
    "CompactionReport": "compact", "compact": "compact", "export_shard": "export",
    "changes_since": "reader",
}

__all__ = [
    "DEFAULT_RETENTION",
    "ChangeEntry",
    "ChangeLog",
    "CompactionReport",
    "Page",
    "ResyncRequired",
    "ShardFormatError",
    "ShardRow",
    "SlotConflictError",
    "Tombstone",
    "apply_page",
    "changes_since",
    "compact",
    "export_shard",
    "open_shard",
    "shard_cursor",
    "shard_partitions",
]


def __getattr__(name: str) -> Any:
    if name in _SERVER_SIDE:
        from importlib import import_module

        return getattr(import_module(f".{_SERVER_SIDE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
