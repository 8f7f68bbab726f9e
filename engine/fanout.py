"""Fan-out: which sinks of a pipeline get a frame.

A pipeline with several sinks has its last stage write one ring per sink. Every frame goes
to every sink unless it carries a ``route`` header (set by a stage, e.g. the ``map`` stage's
``route`` rules): a sink name or a list of them. The name ``discard`` is reserved: a stage
drops such frames itself, and a route that names it here sends the frame nowhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine.masking import mask_card_numbers

ROUTE = "route"  # the frame header naming the sinks a frame goes to
DISCARD = "discard"  # the route that goes nowhere


class RouteError(ValueError):
    """A frame's ``route`` header names no sink of its pipeline, or is not a name."""


def targets(headers: Mapping[str, Any], sinks: Sequence[str]) -> tuple[int, ...]:
    """Indexes into ``sinks`` of the sinks a frame with ``headers`` goes to.

    Raises:
        RouteError: the route is not a text or a list of texts, or names an unknown sink.
    """
    route = headers.get(ROUTE)
    if route is None:
        return tuple(range(len(sinks)))
    names = [route] if isinstance(route, str) else route
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RouteError(f"route header must be a sink name or a list of them: "
                         f"type={type(route).__name__}")
    picked: list[int] = []
    for name in names:
        if name == DISCARD:
            continue
        try:
            i = sinks.index(name)
        except ValueError:
            # the header came with the frame: it is logged, so no card number in it
            raise RouteError(f"route names no sink of the pipeline: "
                             f"route={mask_card_numbers(name[:64])!r}, "
                             f"sinks={','.join(sinks)}") from None
        if i not in picked:
            picked.append(i)
    return tuple(picked)
