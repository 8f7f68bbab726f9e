"""The ``mixer`` command line (typer): the central registry, telemetry and audit service."""

from __future__ import annotations

from pathlib import Path

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


@app.command()
def init(
    data_dir: Path = typer.Argument(..., help="the hub's data dir (created 0700)"),
    host: list[str] = typer.Option(["127.0.0.1", "localhost"], "--host", help=(
        "a name or address racks dial to reach the hub, repeatable (the hub certificate's "
        "subject alternative names)")),
) -> None:
    """Create a hub's data dir: its certificate authority and the hub's TLS certificate
    (private keys 0600, never overwritten)."""
    from mixer.pki import PkiError, init_pki

    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pki = init_pki(data_dir, host)
    except (PkiError, OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"hub initialised: data_dir={data_dir}")
    typer.echo(f"  CA certificate (give to racks): {pki.ca_cert}")
    typer.echo(f"  hub certificate for: {', '.join(host)}")


def main() -> None:
    """Console-script entry point."""
    app()
