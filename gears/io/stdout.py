"""Stdout sink: frames as JSON lines on the process's standard output (no settings)."""

from __future__ import annotations

import sys

from engine.frame import Frame
from gears.base import Sink
from gears.io.jsonl import frame_json


class StdoutSink(Sink):
    """JSON lines on stdout, flushed per batch."""

    async def write(self, frames: list[Frame]) -> None:
        out = sys.stdout.buffer
        out.write(b"".join(map(frame_json, frames)))
        out.flush()
