"""The egress sink: frames leave the rack into JetStream.

This gear only declares the settings; the work is done by the rack's egress process
(``engine.egress``), which serves every egress sink of every pipeline over one NATS
connection. Settings::

    subject: fluxrig.demo.events     # must be captured by one stream in egress.streams
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.schema import SUBJECT_RE, At, get_map, get_str
from gears.base import Sink


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressSettings:
    subject: str


class Egress(Sink):
    """Marker gear: frames routed here are published by the egress process."""

    to_jetstream = True

    @classmethod
    def parse_settings(cls, raw: Any, at: At) -> EgressSettings:
        m = get_map(raw, at, {"subject"})
        return EgressSettings(subject=get_str(m, "subject", at, pattern=SUBJECT_RE,
                                              rule="a NATS subject without wildcards"))
