"""Errors of device sync: every one a `SlipstreamError`, each message naming the fix."""

from __future__ import annotations

from slipstream.index.errors import ConfigurationError, SlipstreamError


class ResyncRequired(SlipstreamError):
    """A cursor is older than the change log's compaction horizon: entries it would need
    are gone, so the device must take a fresh snapshot (export) and swap it in."""

    def __init__(self, cursor: int, horizon: int) -> None:
        self.cursor, self.horizon = cursor, horizon
        super().__init__(
            f"cursor {cursor} is older than the change log's compaction horizon {horizon}: "
            "changes it would need were compacted away; take a new snapshot of the partition "
            "(export a new shard) and continue from its cursor")


class ShardFormatError(SlipstreamError):
    """A shard file this code cannot read: not a shard, or an unsupported `format_version`
    or `analyzer`. Nothing in it was changed."""


class ShardPathError(SlipstreamError):
    """The shard's file, or the directory it goes in, cannot be written (no such
    directory, no permission, no space left). The shard there before is unchanged."""


class SlotConflictError(ConfigurationError):
    """A second replication slot tried to write into a schema whose change log is already
    written by another slot; both would assign the same sequence numbers."""

    def __init__(self, schema: str, owner: str, slot: str) -> None:
        self.schema, self.owner, self.slot = schema, owner, slot
        super().__init__(
            f"the change log of schema {schema!r} is written by slot {owner!r}; slot {slot!r} "
            "cannot write into it too (both would assign the same sequence numbers). Give this "
            f"worker its own search schema, or, if slot {owner!r} is gone for good, release its "
            f"claim: DELETE FROM {schema}.changelog_writer")
