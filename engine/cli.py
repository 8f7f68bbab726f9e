"""The ``engine`` command line (typer). Thin: parses arguments and calls into the engine."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="fluxrig rack engine: run and inspect a rack on this machine.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the fluxrig version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("fluxrig"))


@app.command()
def demo(seconds: float = typer.Option(5.0, help="how long to run")) -> None:
    """Push frames through a shared-memory ring between two processes and report."""
    from engine.demo import run

    raise typer.Exit(run(seconds))


def main() -> None:
    """Console-script entry point."""
    app()
