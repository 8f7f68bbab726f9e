"""Generator source: frames at a set rate (or as fast as the ring takes them), for demos,
tests and benchmarks.

Settings::

    rate: 10000        # frames per second; 0 = as fast as backpressure allows
    count: 0           # stop after this many frames; 0 = until the rack stops
    batch: 64          # frames per emit
    kind: demo.reading
    keys: 16           # cardinality of {i} below
    headers: {device: "dev-{i}"}
    body: {seq: "$seq", temp_c: 21.5, device: "dev-{i}"}

Template values: the string ``"$seq"`` becomes the frame's sequence number (int), ``"$ts"``
its timestamp; other strings are ``str.format`` templates with ``seq`` and ``i = seq % keys``.
A restarted generator continues numbering from where the previous one stopped only as far
as the frames reached the ring; it is a test tool, not a source of record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.frame import Frame, new_frame
from engine.keytable import CUSTOM, INTEGER, MAP, NUMBER, STRING, Key, Table
from engine.schema import At
from gears.base import Source

SETTINGS = Table("generator", "Frames at a set rate, for demos, tests and benchmarks.", (
    Key("rate", NUMBER, "Frames per second; 0: as fast as backpressure allows.", 1000.0,
        minimum=0),
    Key("count", INTEGER, "Stop after this many frames; 0: until the rack stops.", 0,
        minimum=0),
    Key("batch", INTEGER, "Frames per emit.", 64, minimum=1, maximum=65536),
    Key("kind", STRING, "Frame kind.", "demo.reading"),
    Key("keys", INTEGER, "Cardinality of ``{i}`` in templates (``i = seq % keys``).", 16,
        minimum=1),
    Key("headers", MAP, "Frame headers; string values are templates.", items="template"),
    Key("body", CUSTOM, "Frame body; strings in it are templates (``$seq``, ``$ts``, "
        "``dev-{i}``).", {"seq": "$seq"}, type_text="any value"),
))


@dataclass(frozen=True, slots=True, kw_only=True)
class GeneratorSettings:
    rate: float
    count: int
    batch: int
    kind: str
    keys: int
    headers: Mapping[str, Any]
    body: Any


def _render(template: Any, seq: int, i: int, ts: int) -> Any:
    if isinstance(template, str):
        if template == "$seq":
            return seq
        if template == "$ts":
            return ts
        return template.format(seq=seq, i=i) if "{" in template else template
    if isinstance(template, Mapping):
        return {k: _render(v, seq, i, ts) for k, v in template.items()}
    if isinstance(template, list):
        return [_render(v, seq, i, ts) for v in template]
    return template


class Generator(Source):
    """Produces ``count`` frames (or endless) at ``rate`` frames/s."""

    settings_table = SETTINGS

    @classmethod
    def parse_settings(cls, raw: Any, at: At) -> GeneratorSettings:
        r = SETTINGS.read(raw, at)
        headers = r.mapping("headers")
        body = r.raw("body") if r.given("body") else SETTINGS.key("body").default
        for name, tmpl in (("headers", headers), ("body", body)):
            try:
                _render(tmpl, 0, 0, 0)
            except Exception as exc:  # any str.format failure is a config error
                raise at.key(name).error(
                    f"bad template: {exc!r} (fields available: seq, i)"
                ) from exc
        return GeneratorSettings(rate=r.number("rate"), count=r.integer("count"),
                                 batch=r.integer("batch"), kind=r.string("kind"),
                                 keys=r.integer("keys"), headers=dict(headers), body=body)

    async def run(self, emit: Callable[[list[Frame]], Awaitable[None]],
                  stopping: asyncio.Event) -> None:
        s: GeneratorSettings = self.settings
        src = f"gen:{self.ctx.pipeline}.{self.ctx.name}"
        seq = 0
        start = time.monotonic()
        while not stopping.is_set() and (s.count == 0 or seq < s.count):
            n = s.batch if s.count == 0 else min(s.batch, s.count - seq)
            if s.rate > 0:
                due = start + (seq + n) / s.rate
                delay = due - time.monotonic()
                if delay > 0:
                    try:
                        await asyncio.wait_for(stopping.wait(), delay)
                        break
                    except TimeoutError:
                        pass
                else:
                    await asyncio.sleep(0)  # behind schedule: still let the loop see signals
            else:
                await asyncio.sleep(0)
            frames = []
            for k in range(seq, seq + n):
                ts = time.time_ns()
                i = k % s.keys
                frames.append(new_frame(
                    src, s.kind, ts=ts,
                    headers=_render(s.headers, k, i, ts),
                    body=_render(s.body, k, i, ts),
                ))
            await emit(frames)
            seq += n
        self.ctx.log.info("generator done: frames=%d", seq)
