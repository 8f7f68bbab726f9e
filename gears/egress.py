"""The egress sink: frames leave the rack into JetStream.

This gear only declares the settings; the work is done by the rack's egress process
(``engine.egress``), which serves every egress sink of every pipeline over one NATS
connection. Settings::

    subject: fluxrig.demo.events     # must be captured by one stream in egress.streams
    subject: uns.v1.>                # ".>": each frame's ``subject`` header completes it
                                     # (a UNS sample's path); the stream captures uns.v1.>
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine.keytable import REQUIRED, STRING, Key, Table
from engine.schema import At
from gears.base import Sink

#: a subject without wildcards, or one ending in ".>" (completed per frame)
SINK_SUBJECT_RE = re.compile(r"^[^\s.*>]+(\.[^\s.*>]+)*(\.>)?$")

SETTINGS = Table("egress", "Frames leave the rack into JetStream (published by the rack's "
                 "egress process).", (
    Key("subject", STRING, "Subject to publish to; exactly one stream of "
        "``egress.streams`` must capture it. Ending in ``.>``: each frame's ``subject`` "
        "header (a subject tail) completes it.", REQUIRED, pattern=SINK_SUBJECT_RE,
        rule="a NATS subject without wildcards, or one ending in .>"),
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
