"""The egress sink: frames leave the rack into JetStream.

This gear only declares the settings; the work is done by the rack's egress process
(``engine.egress``), which serves every egress sink of every pipeline over one NATS
connection. Settings::

    subject: fluxrig.demo.events     # must be captured by one stream in egress.streams
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.keytable import REQUIRED, STRING, Key, Table
from engine.schema import SUBJECT_RE, At
from gears.base import Sink

SETTINGS = Table("egress", "Frames leave the rack into JetStream (published by the rack's "
                 "egress process).", (
    Key("subject", STRING, "Subject to publish to; exactly one stream of "
        "``egress.streams`` must capture it.", REQUIRED, pattern=SUBJECT_RE,
        rule="a NATS subject without wildcards"),
))


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressSettings:
    subject: str


class Egress(Sink):
    """Marker gear: frames routed here are published by the egress process."""

    to_jetstream = True
    settings_table = SETTINGS

    @classmethod
    def parse_settings(cls, raw: Any, at: At) -> EgressSettings:
        return EgressSettings(subject=SETTINGS.read(raw, at).string("subject"))
