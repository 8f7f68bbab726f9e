"""The ``mixer`` command's entry point: the quick questions first (``mixer.ask``), the typer
CLI (``mixer.cli``) for everything else — so ``mixer racks DIR --json`` and ``mixer traces
DIR QUERY`` do not pay for importing the CLI framework and the NATS client."""

from __future__ import annotations

import sys


def main() -> None:
    """Console-script entry point."""
    from mixer.ask import quick_main

    if quick_main(sys.argv[1:]):
        return
    from mixer.tracecli import quick_traces

    quick_traces(sys.argv[1:])  # exits when it ran the lookup
    from mixer.cli import main as cli_main

    cli_main()
