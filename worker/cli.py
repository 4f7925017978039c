"""The `slipstream` command line: one click group whose commands run the worker's parts."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="slipstream")
def main() -> None:
    """slipstream: hybrid search for an existing Postgres application, fed by logical replication."""


@main.command()
def demo() -> None:
    """Run the end-to-end demo on an embedded Postgres."""
    click.echo("The demo is not built yet: it arrives with the worker (`slipstream run`).")
