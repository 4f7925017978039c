"""Old name of `localpg` (the local PostgreSQL for the demo, tests and benchmarks); import that."""

from .localpg import DEFAULT_SETTINGS, EmbeddedPostgres  # noqa: F401
