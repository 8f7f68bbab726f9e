"""Frames as JSON lines, shared by the file and stdout sinks.

Bytes become ``{"$hex": "..."}`` (JSON has no byte strings); the id is the UUID text form.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from engine.frame import Frame


def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$hex": bytes(value).hex()}
    raise TypeError(f"not JSON-serialisable: type={type(value).__name__}")


def frame_json(frame: Frame) -> bytes:
    """One JSON line (with the newline) for ``frame``."""
    return orjson.dumps(
        {
            "id": str(uuid.UUID(bytes=frame.id)),
            "ts": frame.ts,
            "src": frame.src,
            "kind": frame.kind,
            "headers": frame.headers,
            "body": frame.body,
        },
        default=_default,
        option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS,
    )
