"""The error hierarchy: every error slipstream raises on purpose is a `SlipstreamError`.

Each subclass names a kind of failure a caller can act on. Messages say what was
wrong and, where there is one, the fix. Other packages (worker, shardsync) add
their own subclasses of these.
"""

from __future__ import annotations


class SlipstreamError(Exception):
    """Root of every error slipstream raises deliberately."""


class ConfigurationError(SlipstreamError):
    """The set-up is wrong (a key, a backend option, a missing extension); the message names the fix."""


class MissingDependencyError(ConfigurationError):
    """An optional dependency is not installed; the message names the extra to install."""


class ValidationError(SlipstreamError, ValueError):
    """A value handed to a public API is not acceptable; nothing was written."""


class InvalidIdentifierError(ValidationError):
    """A name that ends up in SQL or a JSON path is not a plain identifier."""


class DimensionMismatchError(ValidationError):
    """A vector's length differs from its space's configured dimension."""

    def __init__(self, space: str, expected: int, actual: int) -> None:
        self.space, self.expected, self.actual = space, expected, actual
        super().__init__(
            f"embedding for space {space!r} has dimension {actual}, but the index is "
            f"configured for {expected}; configure the backend with spaces={{{space!r}: {actual}}} "
            f"or use an embedder that emits {expected}-d vectors"
        )


class UnknownSpaceError(ValidationError):
    """An embedding space was named that the backend does not define."""


class ScopeError(ValidationError):
    """A server search did not state its scope (`partition=` or `all_partitions=True`)."""
