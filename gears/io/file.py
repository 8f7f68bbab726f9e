"""File sink: appends frames as JSON lines.

Settings: ``path`` (relative paths are under the rack's data dir), ``fsync`` (default false:
the page cache survives a process crash; set true to survive a power cut at a cost per batch).
A batch is committed upstream only after it is written (and fsynced when asked), so a crash
may repeat lines of the last batch, never lose one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from engine.frame import Frame
from engine.keytable import BOOLEAN, REQUIRED, STRING, Key, Table
from engine.schema import At
from gears.base import GearContext, Sink
from gears.io.jsonl import frame_json

SETTINGS = Table("file", "Appends frames as JSON lines to a file.", (
    Key("path", STRING, "The file; a relative path is under the rack's data dir.", REQUIRED),
    Key("fsync", BOOLEAN, "fsync after every batch (survives a power cut, costs a disk "
        "flush per batch).", False),
))


@dataclass(frozen=True, slots=True, kw_only=True)
class FileSettings:
    path: str
    fsync: bool


class FileSink(Sink):
    """Append-only JSON-lines file."""

    settings_table = SETTINGS

    @classmethod
    def parse_settings(cls, raw: Any, at: At) -> FileSettings:
        r = SETTINGS.read(raw, at)
        return FileSettings(path=r.string("path"), fsync=r.boolean("fsync"))

    def __init__(self, settings: FileSettings, ctx: GearContext):
        super().__init__(settings, ctx)
        path = os.path.join(ctx.data_dir, settings.path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    async def write(self, frames: list[Frame]) -> None:
        data = b"".join(map(frame_json, frames))
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        if self.settings.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)
