"""The ``mixer`` command line (typer): the central registry, telemetry and audit service."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="fluxrig mixer: registry, fleet telemetry and audit trail for many racks.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the fluxrig version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("fluxrig"))


def main() -> None:
    """Console-script entry point."""
    app()
