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


class DocumentTooLargeError(ValidationError):
    """A document has more distinct terms than the server's text search vector can hold."""


class UnknownSpaceError(ValidationError):
    """An embedding space was named that the backend does not define."""


class ScopeError(ValidationError):
    """A server search did not state its scope (`partition=` or `all_partitions=True`)."""


class EmbedderChangedError(ConfigurationError):
    """A space's vectors were made by another embedder than the one configured now."""

    def __init__(self, space: str, recorded: str, configured: str, upcoming: str | None = None) -> None:
        self.space, self.recorded, self.configured = space, recorded, configured
        then = ""
        if upcoming == configured:
            then = (" A re-embed to it has started: let it finish (the same command resumes "
                    "it and switches when complete), then start again.")
        super().__init__(
            f"space {space!r} holds vectors from embedder {recorded!r}, but {configured!r} is "
            f"configured; mixing models in one space would corrupt its ranking. Run "
            f"`slipstream reembed --space {space}` with the new configuration to re-embed the "
            f"space in the background and switch when it is complete, or restore the previous "
            f"embedder settings.{then}")
